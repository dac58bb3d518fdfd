"""Which providers are polled: an explicit registry, and one supervised task per enabled provider
that polls while this replica holds the provider's lease."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time

import httpx
import structlog

from bus.core import Bus
from bus.lease import Lease, holder_id
from bus.messages import MessageState
from bus.statuses import PROVIDERS
from bus.supervisor import Beat, Restart
from pollers import epochta, smsc, smspager, smspilot, smstower
from pollers.engine import ProviderPoller
from pollers.types import Build

log = structlog.get_logger("smsbus.pollers")

REGISTRY: dict[str, Build] = {
    "smspilot": smspilot.provider,
    "smstower": smstower.provider,
    "smspager": smspager.provider,
    "smsc": smsc.provider,
    "epochta": epochta.provider,
}
STOP_WAIT = 5.0
UNPOLLED_WARN_EVERY = 3600.0  # seconds between warnings of one provider's unpolled messages
# SMSPilot's statuses come by callback: tracked with no API key, its messages are still read.
PUSHES = {"smspilot"}


def pollers_for(bus: Bus, client: httpx.AsyncClient) -> list[ProviderPoller]:
    return [
        ProviderPoller(REGISTRY[name](settings, client), bus, settings)
        for name, settings in bus.settings.providers.items()
        if settings.enabled
    ]


async def start_pollers(bus: Bus, stack: contextlib.AsyncExitStack) -> list[ProviderPoller]:
    """Start a supervised `poller-<provider>` task for each enabled provider; the stack stops
    them (and then closes their HTTP client) on exit."""
    http = await stack.enter_async_context(
        httpx.AsyncClient(headers={"user-agent": "smsbus"}, follow_redirects=False)
    )
    pollers = pollers_for(bus, http)
    unpolled = functools.partial(warn_unpolled, bus, {p.name for p in pollers} | PUSHES)
    stack.push_async_callback(bus.supervisor.spawn("unpolled-warning", unpolled))
    if not pollers:
        return pollers
    holder = holder_id()
    log.info("polling", providers=[p.name for p in pollers], holder=holder)
    for poller in pollers:
        bus.metrics.polled.labels(poller.name).set(1)
        lease = Lease(bus.leases, poller.name, holder, bus.settings.lease_ttl)
        stop = bus.supervisor.spawn(f"poller-{poller.name}", functools.partial(lead, poller, lease))
        stack.push_async_callback(stop)
    return pollers


async def warn_unpolled(bus: Bus, polled: set[str], beat: Beat) -> None:
    """A warning (at most hourly) while messages are tracked for a provider this replica does
    not poll, its credentials not set here: a registration for it is accepted (a replica with
    them polls it, or this one once they are set), but nothing here will read its statuses or
    expire it. Once at start for what the mirror holds, then as registrations come in. Across
    replicas, the SmsbusTrackedNotPolled alert."""
    mirror = bus.states.mirror
    warned: dict[str, float] = {}

    def check(provider: str) -> None:
        now = time.monotonic()
        if provider in polled or now - warned.get(provider, -math.inf) < UNPOLLED_WARN_EVERY:
            return
        warned[provider] = now
        log.warning(
            "messages tracked for a provider this replica does not poll: no credentials here; "
            "they get no status and no expiry unless a replica with them polls it",
            provider=provider, tracked=mirror.open_count(provider),
            credentials=f"SMSBUS_{provider.upper()}_*",
        )  # fmt: skip

    def changed(state: MessageState) -> None:
        if state.tracked and not state.final:
            check(state.provider)

    await bus.states.follower.loaded.wait()
    beat()
    for provider in PROVIDERS:
        if mirror.open_count(provider):
            check(provider)
    mirror.listeners.append(changed)


async def lead(poller: ProviderPoller, lease: Lease, beat: Beat) -> None:
    """Poll while holding the provider's lease; wait for it otherwise. A poller that fails ends
    this term (the lease is given back) and the supervisor starts the task again."""
    while True:
        beat()
        tried = time.monotonic()
        if not await lease.acquire():
            # The next try comes a period after this one began: a try that hung on a stalled
            # NATS has waited its share already, so the first one after NATS answers again is
            # not put off by a whole period more.
            await asyncio.sleep(max(0.0, lease.retry_every - (time.monotonic() - tried)))
            continue
        log.info("leading", provider=poller.name)
        poller.stopping = False
        term = asyncio.create_task(poller.run(beat), name=f"smsbus-poll-{poller.name}")
        try:
            while not term.done():
                await asyncio.wait({term}, timeout=lease.renew_every)
                beat()
                if (stuck := poller.stuck(time.monotonic())) is not None:
                    raise Restart(stuck)  # the lease given back below, the term ended
                if not term.done() and not await lease.renew():
                    log.warning("lease lost; polling stops here", provider=poller.name)
                    break
        finally:
            # The flag ends the loops even where nats-py turned the cancellation into its error.
            poller.stopping = True
            term.cancel()
            await asyncio.wait({term}, timeout=STOP_WAIT)
            if lease.held():
                await lease.release()
        if term.done() and not term.cancelled() and term.exception() is not None:
            raise term.exception()  # type: ignore[misc]
