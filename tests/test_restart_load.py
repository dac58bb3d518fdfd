"""Read your writes across a restart: while a restarted replica loads its state mirror (every open
message, read through the bucket's watch), callbacks for registered messages still carry their
tracking data. Their bucket reads go on a NATS connection of their own, not behind the load's
deliveries: behind them, at 100,000 open messages, reads waited seconds, timed out, and events
went out without `phone` and `client_ref`."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Smsbus, free_port, read_stream, wait_for

pytestmark = pytest.mark.slow
OPEN = 200_000
CALLBACKS, AT_ONCE = 640, 64


def test_callbacks_during_a_restarts_mirror_load_carry_their_tracking_data(
    tmp_path: Path,
) -> None:
    # The embedded nats-server, restarted with smsbus: the laptop's case, and the harder one
    # (the server reads its store back while the mirror loads).
    nats_port = free_port()
    bus = Smsbus({"SMSBUS_EMBEDDED_NATS_PORT": str(nats_port)}, tmp_path / "bus")
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
