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
    pollers = []
    for name, settings in runtime.settings.providers.items():
        if not settings.enabled:
            continue
        if name not in REGISTRY:
            log.warning(
                "credentials set but this provider's poller is not available", provider=name
            )
            continue
        pollers.append(ProviderPoller(REGISTRY[name](settings, client), runtime, settings))
    return pollers


async def run_pollers(runtime: Runtime) -> None:
    """Poll every enabled provider until cancelled."""
    async with httpx.AsyncClient(
        headers={"user-agent": "smsbus"}, follow_redirects=False
    ) as client:
        pollers = pollers_for(runtime, client)
        if not pollers:
            return
        log.info("polling", providers=[p.name for p in pollers])
        async with asyncio.TaskGroup() as group:
            for poller in pollers:
                group.create_task(poller.run(), name=f"smsbus-poller-{poller.name}")
