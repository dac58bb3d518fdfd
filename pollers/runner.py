"""Which providers are polled: an explicit registry, and the task that runs the enabled ones."""

from __future__ import annotations

import asyncio

import httpx
import structlog

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

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="smsbus-pollers")

    async def stop(self, timeout: float = 10.0) -> None:
        # The flags end the loops even where nats-py turned the cancellation into its own error.
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
            log.info("polling", providers=[p.name for p in self._pollers])
            async with asyncio.TaskGroup() as group:
                for poller in self._pollers:
                    group.create_task(poller.run(), name=f"smsbus-poller-{poller.name}")
