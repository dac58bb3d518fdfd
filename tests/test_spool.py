from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path

from bus.events import Event, status_event, utcnow
from bus.spool import Spool
from tests.support import await_for


def event(n: int) -> Event:
    return Event(
        id=f"id{n}",
        subject=f"sms.status.smspilot.s{n}",
        type="status",
        provider="smspilot",
        payload=b'{"n":%d}' % n,
    )


def test_rows_survive_reopening_in_order_and_go_only_when_deleted(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"

    async def first() -> None:
        spool = Spool(path)
        await spool.open()
        await asyncio.gather(*(spool.append(event(n)) for n in range(50)))
        assert 50 == spool.depth
        await spool.close()

    async def second() -> list[Event]:
        depths: list[int] = []
        spool = Spool(path, on_depth=depths.append)
        await spool.open()
        rows = await spool.head(10)
        await spool.delete([row.seq for row in rows])
        rest = await spool.head(100)
        await spool.close()
        assert [50, 40] == depths
        return [row.event for row in rest]

    asyncio.run(first())
    rest = asyncio.run(second())
    assert [event(n) for n in range(10, 50)] == rest


def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    async def run() -> int:
        spool = Spool(tmp_path / "s.sqlite3")
        await spool.open()
        commits = 0
        original = spool._insert

        def counting(events: list[Event]) -> int:
            nonlocal commits
            commits += 1
            return original(events)

        spool._insert = counting  # type: ignore[method-assign]
        await asyncio.gather(*(spool.append(event(n)) for n in range(200)))
        await spool.close()
        return commits

    assert asyncio.run(run()) < 200


def test_a_spooled_status_event_keeps_its_trace_header(tmp_path: Path) -> None:
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = status_event(
        "sms", "smspilot", "42", "2", via="callback", received_at=utcnow(), traceparent=trace
    )

    async def round_trip() -> Event:
        spool = Spool(tmp_path / "spool.sqlite3")
        await spool.open()
        await spool.append(traced)
        [row] = await spool.head(1)
        await spool.close()
        return row.event

    back = asyncio.run(round_trip())
    assert (back.payload, back.headers) == (traced.payload, traced.headers)
    assert back.headers["traceparent"] == trace


def test_sends_without_an_answer_are_kept_first_and_last(tmp_path: Path) -> None:
    """A row knows when its event was first and last sent without an answer: the drainer
    searches the stream around those times before it publishes the event again."""

    async def scenario() -> list[tuple[float, float] | None]:
        spool = Spool(tmp_path / "spool.sqlite3")
        await spool.open()
        await spool.append(event(1))  # never sent (NATS away)
        await spool.append(event(2), sent_at=100.0)  # sent, no ack
        rows = await spool.head(10)
        await spool.mark_sent([row.seq for row in rows], 160.0)  # the drainer's try
        await spool.mark_sent([rows[1].seq], 220.0)
        sent = [row.sent for row in await spool.head(10)]
        await spool.close()
        return sent

    assert [(160.0, 160.0), (100.0, 220.0)] == asyncio.run(scenario())


def test_sends_the_disk_will_not_record_are_kept_in_memory(tmp_path: Path) -> None:
    """A disk that refuses writes refuses the record of a send too: the drainer goes on, and
    the rows still say when their events were sent, so the stream is searched before they are
    published again (this SQLite connection made read-only stands for the disk)."""

    async def scenario() -> list[list[tuple[float, float] | None]]:
        spool = Spool(tmp_path / "spool.sqlite3")
        await spool.open()
        await spool.append(event(1), sent_at=100.0)
        await spool.append(event(2))
        rows = await spool.head(10)
        await spool._run(spool._db.execute, "PRAGMA query_only = 1")  # type: ignore[union-attr]
        await spool.mark_sent([row.seq for row in rows], 160.0)
        refused = [row.sent for row in await spool.head(10)]
        await spool._run(spool._db.execute, "PRAGMA query_only = 0")  # type: ignore[union-attr]
        await spool.mark_sent([rows[1].seq], 220.0)
        taken = [row.sent for row in await spool.head(10)]
        await spool.delete([rows[0].seq])
        after = [row.sent for row in await spool.head(10)]
        await spool.close()
        return [refused, taken, after]

    assert [
        [(100.0, 160.0), (160.0, 160.0)],
        [(100.0, 160.0), (160.0, 220.0)],
        [(160.0, 220.0)],
    ] == asyncio.run(scenario())


def test_a_deletion_whose_caller_is_cancelled_still_counts(tmp_path: Path) -> None:
    """The drainer is cancelled at shutdown, maybe while its deletion runs on the spool's
    thread: the rows are gone, and the depth must say so, or the shutdown's last drain waits its
    whole timeout for rows that are not there and says it kept them."""
    path = tmp_path / "spool.sqlite3"

    async def scenario() -> tuple[int, list[object]]:
        spool = Spool(path)
        await spool.open()
        for n in range(3):
            await spool.append(event(n))
        seqs = [row.seq for row in await spool.head(10)]
        held = threading.Event()
        spool._thread.submit(held.wait)  # the spool's thread, busy until the deletion waits
        deleting = asyncio.create_task(spool.delete(seqs))
        await asyncio.sleep(0.05)  # the deletion is handed to the spool's thread
        held.set()
        with contextlib.closing(sqlite3.connect(path)) as other:
            deadline = time.monotonic() + 5  # the loop is held here: it cannot see it finish
            while other.execute("SELECT count(*) FROM spool").fetchone()[0]:
                assert time.monotonic() < deadline, "the deletion did not run"
                time.sleep(0.005)
        deleting.cancel()  # before the loop hears that the thread is done
        with contextlib.suppress(asyncio.CancelledError):
            await deleting

        async def counted() -> bool:
            return spool.depth == 0

        await await_for(counted, timeout=2, what="the depth to follow the deletion")
        head = await spool.head(10)
        await spool.close()
        return spool.depth, list(head)

    assert (0, []) == asyncio.run(scenario())
