"""Group commit: callbacks answered together share JetStream round trips (fast batches), each
is stored once whatever repeats it holds, and no subscriber of the event subjects sees anything
but events."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from pathlib import Path

import httpx
import nats

from tests.support import NatsServer, Smsbus, isolated_env, read_stream

_ids = itertools.count(random.randrange(10**9, 10**10))


def test_callbacks_at_once_share_round_trips_and_repeats_are_stored_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path / "bus").start()
    try:
        ids = [str(next(_ids)) for _ in range(300)]
        sent = ids + ids[::3]  # a third of them twice, mixed into the same bursts
        random.Random(7).shuffle(sent)

        async def burst() -> tuple[list[tuple[int, str]], list[bytes]]:
            seen: list[bytes] = []

            async def note(msg: nats.aio.msg.Msg) -> None:
                seen.append(msg.data)

            nc = await nats.connect(nats_server.url)
            await nc.subscribe(f"{bus.prefix}.>", cb=note)
            await nc.flush()
            async with httpx.AsyncClient(base_url=bus.base, timeout=10) as client:

                async def one(server_id: str) -> tuple[int, str]:
                    answer = await client.get(
                        "/callbacks/smspilot", params={"server_id": server_id, "status": 2}
                    )
                    return answer.status_code, answer.text

                answers = await asyncio.gather(*(one(i) for i in sent))
            await nc.flush()
            await nc.close()
            return answers, seen

        answers, seen = asyncio.run(burst())
        assert [(200, "OK")] * len(sent) == answers
        stored = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.>")
        counts = collections.Counter(s.event["subject"] for s in stored)
        assert dict.fromkeys(ids, 1) == dict(counts)
        batches = bus.metric("smsbus_publish_batch_events_count")
        events = bus.metric("smsbus_publish_batch_events_sum")
        known = bus.metric("smsbus_callbacks_total", outcome="duplicate")  # recorded already
        assert len(sent) == events + known
        assert batches < events / 2, (batches, events)
        assert all(body.startswith(b'{"specversion":"1.0"') for body in seen)  # no commit junk
        assert 0 == bus.metric("smsbus_publish_failures_total")
    finally:
        assert 0 == bus.stop()
