"""Read your writes across a restart: while a restarted replica loads its state mirror (every open
message, read through the bucket's watch), callbacks for registered messages still carry their
tracking data. Their bucket reads go on a NATS connection of their own, not behind the load's
deliveries: behind them, at 100,000 open messages, reads waited seconds, timed out, and events
went out without `phone` and `client_ref`. The poller's lease goes there too: behind the load, its
renewals timed out and the leader gave its lease up."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.epochta import FakeEpochta
from tests.fakes.server import Served
from tests.support import Smsbus, free_port, read_stream, wait_for

pytestmark = pytest.mark.slow
OPEN = 200_000
CALLBACKS, AT_ONCE = 640, 64
# A short lease: renewed every 0.8 s, each call given 0.5 s (bus.lease), so that many renewals
# fall within the load.
LEASE_TTL = "4"
LEASE_TROUBLE = ("lease not acquired", "lease not renewed", "lease lost; polling stops here")


def test_callbacks_during_a_restarts_mirror_load_carry_their_tracking_data(
    tmp_path: Path,
) -> None:
    # The embedded nats-server, restarted with smsbus: the laptop's case, and the harder one
    # (the server reads its store back while the mirror loads).
    nats_port = free_port()
    pochta = FakeEpochta()  # a provider polled by this replica, its leader
    with Served(pochta.app) as served:
        env = {
            "SMSBUS_EMBEDDED_NATS_PORT": str(nats_port),
            "SMSBUS_EPOCHTA_URL": served.url,
            "SMSBUS_EPOCHTA_USERNAME": pochta.username,
            "SMSBUS_EPOCHTA_PASSWORD": pochta.password,
            "SMSBUS_LEASE_TTL": LEASE_TTL,
        }
        _restart_under_load(Smsbus(env, tmp_path / "bus"), nats_port)


def _restart_under_load(bus: Smsbus, nats_port: int) -> None:
    try:
        bus.start()
        first = random.randrange(10**9, 10**10)
        ids = [str(first + i) for i in range(OPEN)]
        with httpx.Client(base_url=bus.api, timeout=60) as client:
            for start in range(0, OPEN, 1000):
                items = [
                    {"provider": "smspilot", "message_id": m, "phone": f"7913{m[-7:]}",
                     "client_ref": f"order-{m}"}
                    for m in ids[start : start + 1000]
                ]  # fmt: skip
                answer = client.post("/v1/messages", json=items)
                assert 202 == answer.status_code, answer.text
        assert 0 == bus.stop()

        bus.start(wait_ready=False)
        mirror = wait_for(
            lambda: bus.readyz().get("watches", {}).get("state-mirror"),
            what="the restarted replica to answer",
        )
        assert mirror["state"] in ("starting", "loading"), mirror  # the load is still going on
        sample = random.sample(ids, CALLBACKS)
        answers = asyncio.run(_callbacks(bus, sample))
        assert [(200, "OK")] * CALLBACKS == [(a[0], a[1]) for a in answers]
        print(f"slowest callback during the load: {max(a[2] for a in answers):.3f} s")
        assert 0 == bus.metric("smsbus_state_reads_failed_total")
        wait_for(
            lambda: (
                bus.readyz().get("watches", {}).get("state-mirror", {}).get("state") == "following"
            ),
            timeout=60,
            what="the mirror to finish loading",
        )
        lines = bus.log_lines()
        assert [] == [line for line in lines if line.get("event") in LEASE_TROUBLE]
        assert 1 == sum(1 for line in lines if line.get("event") == "leading"), "leads throughout"

        stored = {}
        url = f"nats://127.0.0.1:{nats_port}"
        for item in read_stream(url, bus.stream, f"{bus.prefix}.status.>"):
            stored[item.event["subject"]] = item.event["data"]
        missing = [m for m in sample if m not in stored]
        assert [] == missing
        untracked = [m for m in sample if stored[m]["client_ref"] != f"order-{m}"]
        assert [] == untracked, f"{len(untracked)} events without their tracking data"
        assert all(stored[m]["phone"] == f"7913{m[-7:]}" for m in sample)
    finally:
        bus.stop()


async def _callbacks(bus: Smsbus, server_ids: list[str]) -> list[tuple[int, str, float]]:
    async with httpx.AsyncClient(base_url=bus.base, timeout=15) as client:

        async def one(server_id: str) -> tuple[int, str, float]:
            started = time.monotonic()
            answer = await client.get(
                "/callbacks/smspilot", params={"server_id": server_id, "status": 1}
            )
            return answer.status_code, answer.text, time.monotonic() - started

        answers = []
        for start in range(0, len(server_ids), AT_ONCE):
            batch = server_ids[start : start + AT_ONCE]
            answers += await asyncio.gather(*(one(s) for s in batch))
        return answers
