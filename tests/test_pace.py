"""Polls give way to requests (bus.pace): the gate's allowance follows the loop's lateness while
requests are served, and is the full concurrency when none are."""

from __future__ import annotations

import asyncio
import time

from bus.pace import LEAST, PERIOD, Pace
from bus.supervisor import Beat, TaskStatus


async def _most_at_once(pace: Pace, concurrency: int, jobs: int) -> tuple[int, list[float]]:
    gate = pace.gate(concurrency)
    busy = most = 0
    starts: list[float] = []

    async def job() -> None:
        nonlocal busy, most
        async with gate:
            starts.append(time.monotonic())
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(0.005)
            busy -= 1

    await asyncio.gather(*(job() for _ in range(jobs)))
    return most, starts


async def _full_concurrency_when_no_request_is_served() -> None:
    pace = Pace()
    pace.share = LEAST  # left over from a busy spell: without requests it does not apply
    most, _ = await _most_at_once(pace, 8, 24)
    assert most == 8


async def _allowance_follows_the_share_while_requests_are_served() -> None:
    pace = Pace()
    pace.foreground()
    pace.share = 0.25
    most, _ = await _most_at_once(pace, 8, 12)
    assert most == 2


async def _below_one_in_flight_batches_are_spaced_out() -> None:
    pace = Pace()
    pace.share = LEAST  # 8 * 1/32: one batch every PERIOD / 0.25
    pace.foreground()
    most, starts = await _most_at_once(pace, 8, 4)
    assert most == 1
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= PERIOD / (8 * LEAST) * 0.95, gaps


async def _hold_up(pace: Pace, turns: int, *, serving: bool) -> None:
    for _ in range(turns):
        if serving:
            pace.foreground()
        time.sleep(0.02)  # a turn of the loop that holds it up, as a poll answer can
        await asyncio.sleep(PERIOD)


async def _a_late_loop_halves_the_share_only_while_requests_are_served() -> None:
    pace = Pace()
    task = asyncio.create_task(pace.measure(Beat(TaskStatus("loop-pace"))))
    try:
        await _hold_up(pace, 10, serving=False)
        assert pace.lag > 0.004 and pace.share == 1.0  # late, but nobody waits for it
        await _hold_up(pace, 10, serving=True)
        assert pace.share <= 0.25
        deadline = time.monotonic() + 5  # on time again: the share grows back
        while pace.share < 1.0 and time.monotonic() < deadline:
            pace.foreground()
            await asyncio.sleep(PERIOD)
        assert pace.share == 1.0
    finally:
        task.cancel()


def test_full_concurrency_when_no_request_is_served() -> None:
    asyncio.run(_full_concurrency_when_no_request_is_served())


def test_allowance_follows_the_share_while_requests_are_served() -> None:
    asyncio.run(_allowance_follows_the_share_while_requests_are_served())


def test_below_one_in_flight_batches_are_spaced_out() -> None:
    asyncio.run(_below_one_in_flight_batches_are_spaced_out())


def test_a_late_loop_halves_the_share_only_while_requests_are_served() -> None:
    asyncio.run(_a_late_loop_halves_the_share_only_while_requests_are_served())
