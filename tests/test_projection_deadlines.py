"""A status event's state write is bounded by its own deadline (SMSBUS_PUBLISH_TIMEOUT from the
event's publish), also when the writes of one loop turn go out together under one timer: each
fails at its deadline, not at the earliest of the batch, and one written in time succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bus.events import Event, status_event, utcnow
from bus.projection import Projection, StateNotWritten
from bus.state import Change


class SlowBucket:
    """Stands in for bus.state.States where only timing matters: the batch of writes is stored
    when the test says so."""

    connected = True

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.batches: list[int] = []

    async def apply(
        self, changes: Sequence[tuple[str, Change]], batches: str = "fast"
    ) -> dict[str, BaseException]:
        self.batches.append(len(changes))
        await self.release.wait()
        return {}


def event(n: int) -> Event:
    return status_event("sms", "smspilot", str(10**9 + n), "2", via="callback",
                        received_at=utcnow())  # fmt: skip


def test_each_write_of_a_batch_fails_at_its_own_deadline() -> None:
    async def scenario() -> None:
        bucket = SlowBucket()
        projection = Projection(bucket)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        start = loop.time()
        writes = [
            asyncio.ensure_future(projection.write(event(1), start + 0.05)),
            asyncio.ensure_future(projection.write(event(2), start + 0.30)),
            asyncio.ensure_future(projection.write(event(3), None)),  # the drainer's: no deadline
        ]
        done, _ = await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
        assert [writes[0]] == list(done)
        with pytest.raises(StateNotWritten):
            writes[0].result()
        assert loop.time() - start < 0.25  # failed at its deadline, not the batch's last
        assert not writes[1].done() and not writes[2].done()
        bucket.release.set()  # stored before the second deadline
        await asyncio.gather(writes[1], writes[2])
        assert [3] == bucket.batches  # one batch for the three

        late = SlowBucket()
        projection = Projection(late)  # type: ignore[arg-type]
        start = loop.time()
        first = asyncio.ensure_future(projection.write(event(4), start + 0.05))
        second = asyncio.ensure_future(projection.write(event(5), start + 0.15))
        with pytest.raises(StateNotWritten):
            await first
        with pytest.raises(StateNotWritten):
            await second
        assert loop.time() - start >= 0.15  # the second waited for its own deadline
        late.release.set()

    asyncio.run(scenario())
