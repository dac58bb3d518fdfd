"""Which providers are polled: an explicit registry, and the task that runs the enabled ones."""

from __future__ import annotations

import asyncio

import httpx
import nats.errors
import structlog

from bus.lease import RETRY, Lease, holder_id, lease_bucket
from bus.runtime import Runtime
from pollers import epochta, smsc, smspager, smspilot, smstower
from pollers.engine import ProviderPoller
from pollers.types import ProviderClient

log = structlog.get_logger("smsbus.pollers")

REGISTRY: dict[str, type[ProviderClient]] = {
    "smspilot": smspilot.Client,
    "smstower": smstower.Client,
    "smspager": smspager.Client,
    "smsc": smsc.Client,
    "epochta": epochta.Client,
}


def pollers_for(runtime: Runtime, client: httpx.AsyncClient) -> list[ProviderPoller]:
    return [
        ProviderPoller(REGISTRY[name](settings, client), runtime, settings)
        for name, settings in runtime.settings.providers.items()
        if settings.enabled
    ]


class Pollers:
    """The pollers of the enabled providers, as one task that `stop` ends within a bound."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._pollers: list[ProviderPoller] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="smsbus-pollers")

    async def stop(self, timeout: float = 10.0) -> None:
        # The flags end the loops even where nats-py turned the cancellation into its own error.
        self._closing = True
        for poller in self._pollers:
            poller.stopping = True
        if self._task is None:
            return
        self._task.cancel()
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            log.warning("pollers did not stop in time; leaving them", timeout_s=timeout)

    async def _run(self) -> None:
        headers = {"user-agent": "smsbus"}
        async with httpx.AsyncClient(headers=headers, follow_redirects=False) as client:
            self._pollers = pollers_for(self._runtime, client)
            if not self._pollers:
                return
            s = self._runtime.settings
            while True:
                try:
                    # Lease calls give up after one retry period, not the usual API timeout: a
                    # call stuck in a NATS leader election must not eat the takeover time.
                    js = self._runtime.nc.jetstream(timeout=max(0.5, s.lease_ttl * RETRY))
                    bucket = await lease_bucket(js, s.stream, s.lease_ttl, s.stream_replicas)
                    break
                except (TimeoutError, nats.errors.Error) as exc:
                    log.warning("lease bucket unavailable; retrying", error=str(exc))
                    await asyncio.sleep(s.lease_ttl / 6)
            holder = holder_id()
            log.info("polling", providers=[p.name for p in self._pollers], holder=holder)
            async with asyncio.TaskGroup() as group:
                for poller in self._pollers:
                    lease = Lease(bucket, poller.name, holder, s.lease_ttl)
                    group.create_task(self._lead(poller, lease), name=f"smsbus-lead-{poller.name}")

    async def _lead(self, poller: ProviderPoller, lease: Lease) -> None:
        """Poll while holding the provider's lease; wait for it otherwise."""
        while not self._closing:
            if not await lease.acquire():
                await asyncio.sleep(lease.retry_every)
                continue
            log.info("leading", provider=poller.name)
            poller.stopping = False
            term = asyncio.create_task(poller.run(), name=f"smsbus-poller-{poller.name}")
            try:
                while not term.done():
                    await asyncio.wait({term}, timeout=lease.renew_every)
                    if not term.done() and not await lease.renew():
                        log.warning("lease lost; polling stops here", provider=poller.name)
                        break
            finally:
                poller.stopping = True
                term.cancel()
                await asyncio.wait({term}, timeout=5)
                if lease.held():
                    await lease.release()
            if term.done() and not term.cancelled() and term.exception() is not None:
                log.error("poller ended", provider=poller.name, error=repr(term.exception()))
