"""Two replicas on one NATS: one leader per provider, takeover within the lease TTL after a
SIGKILL, polling carries on, and SMSC's "no 4th identical request a minute" holds across them."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.server import Served
from tests.fakes.smsc import FakeSmsc
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

pytestmark = pytest.mark.slow
LEASE_TTL = 4.0
SMSC_INTERVAL = 21.0
_ids = itertools.count(random.randrange(10**8, 10**9))


def providers(bus: Smsbus) -> dict[str, Any]:
    try:
        body = httpx.get(f"{bus.base}/readyz", timeout=2).json()
    except httpx.TransportError:
        return {}
    return dict(body["providers"])


def leader_of(buses: list[Smsbus], provider: str) -> Smsbus | None:
    leading = [b for b in buses if providers(b).get(provider, {}).get("leader")]
    assert len(leading) <= 1, f"{len(leading)} replicas lead {provider}"
    return leading[0] if leading else None


def test_one_leader_per_provider_and_takeover_after_sigkill(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    tower, smsc = FakeSmstower(), FakeSmsc()
    smsc.send(5000, ["380501"], status=1)  # a full history row, as the document gives it
    with Served(tower.app) as t, Served(smsc.app) as s:
        env = isolated_env(
            nats_server.url,
            SMSBUS_LEASE_TTL=str(LEASE_TTL),
            **tower.settings(t.url),
            SMSBUS_SMSC_URL=s.url,
            SMSBUS_SMSC_LOGIN=smsc.login,
            SMSBUS_SMSC_PASSWORD=smsc.password,
            SMSBUS_SMSC_INTERVAL=str(int(SMSC_INTERVAL)),
        )
        buses = [Smsbus(env, tmp_path / name).start() for name in ("a", "b")]
        try:
            leader = wait_for(lambda: leader_of(buses, "smsc"), what="an SMSC leader")
            wait_for(lambda: leader_of(buses, "smstower"), what="an SMSTOWER leader")
            wait_for(lambda: len(smsc.forms) >= 2, what="the leader's first SMSC polls")

            message = str(next(_ids))
            tower.statuses[message] = ("processing", "")
            httpx.post(f"{buses[0].api}/v1/messages",
                       json={"provider": "smstower", "message_id": message})  # fmt: skip

            def statuses() -> list[str]:
                found = read_stream(nats_server.url, buses[0].stream, f"{buses[0].prefix}.status.>")
                return [e.event["data"]["status"] for e in found if e.event["subject"] == message]

            wait_for(lambda: statuses() == ["sent"], what="the first poll")

            # Kill the SMSC leader; the survivor must lead everything within the lease TTL.
            led = [p for p, state in providers(leader).items() if state["leader"]]
            survivor = next(b for b in buses if b is not leader)
            leader.kill()
            killed_at = time.monotonic()
            wait_for(
                lambda: all(providers(survivor)[p]["leader"] for p in led),
                timeout=LEASE_TTL + 5,
                what="the survivor to take over",
            )
            took = time.monotonic() - killed_at
            assert took <= LEASE_TTL, f"takeover took {took:.1f} s"

            # Polling carries on from the shared state: the change is picked up.
            tower.statuses[message] = ("delivered", msk_now())
            wait_for(lambda: statuses() == ["sent", "delivered"], what="polling after takeover")

            # The survivor's SMSC polls keep the interval across the handover: never refused.
            polls = len(smsc.forms)
            wait_for(lambda: len(smsc.forms) > polls, timeout=SMSC_INTERVAL + 10,
                     what="the survivor's first SMSC poll")  # fmt: skip
            assert 0 == smsc.refused
        finally:
            for bus in buses:
                if bus.proc is not None and bus.proc.poll() is None:
                    assert 0 == bus.stop()
