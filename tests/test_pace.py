"""Polls give way to requests (bus.pace): the gate's allowance follows the loop's lateness while
requests are served (down to FEW of it for requests one by one, further while they crowd in), is
the full concurrency when none are served, and never falls below the poller's floor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bus.pace import CROWD, FEW, FLOOR, LEAST, PERIOD, QUIET, Floor, Pace
from bus.supervisor import Beat, TaskStatus


async def _most_at_once(
    pace: Pace, concurrency: int, jobs: int, *, hold: float = 0.005,
    floor: Callable[[], float] = lambda: 0.0,
) -> tuple[int, list[float]]:  # fmt: skip
    gate = pace.gate(concurrency, floor)
    busy = most = 0
    starts: list[float] = []

    async def job() -> None:
        nonlocal busy, most
        async with gate:
            starts.append(time.monotonic())
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(hold)
            busy -= 1

    await asyncio.gather(*(job() for _ in range(jobs)))
    return most, starts


def _gaps(starts: list[float]) -> list[float]:
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


async def _full_concurrency_when_no_request_is_served() -> None:
    pace = Pace()
    pace.share = LEAST  # left over from a busy spell: without requests it does not apply
    most, _ = await _most_at_once(pace, 8, 24)
    assert most == 8


async def _allowance_follows_the_share_while_requests_are_served() -> None:
    pace = Pace()
    pace.started()
    pace.share = 0.25
    most, _ = await _most_at_once(pace, 8, 12)
    assert most == 2


async def _below_one_in_flight_batches_are_spaced_out() -> None:
    pace = Pace()
    pace.share = LEAST  # 8 * 1/128: one batch every PERIOD * 16
    pace.started()  # served all along: the spacing holds past QUIET
    most, starts = await _most_at_once(pace, 8, 4)
    assert most == 1
    assert starts[-1] - starts[0] > QUIET
    assert min(_gaps(starts)) >= PERIOD / (8 * LEAST) * 0.95, _gaps(starts)
    pace.finished()
    deadline = time.monotonic() + QUIET + 0.1  # the last request long gone: full pace
    while pace.contended:
        assert time.monotonic() < deadline
        await asyncio.sleep(PERIOD)
    most, _ = await _most_at_once(pace, 8, 16)
    assert most == 8


async def _the_floor_holds_whatever_the_share() -> None:
    pace = Pace()
    pace.share = LEAST  # alone, one batch every 320 ms (4 * LEAST in flight)
    pace.started()
    # 10 a second needed: every 100 ms, not 320.
    _, starts = await _most_at_once(pace, 4, 4, floor=lambda: 10.0)
    gaps = _gaps(starts)
    assert 0.1 * 0.95 <= min(gaps) and max(gaps) < 0.2, gaps
    # More than FLOOR a second needed: FLOOR, the next one started while the last is still in
    # flight (each held 60 ms).
    most, starts = await _most_at_once(pace, 8, 6, hold=0.06, floor=lambda: 1000.0)
    gaps = _gaps(starts)
    assert 0.95 / FLOOR <= min(gaps) and max(gaps) < 1.5 / FLOOR, gaps
    assert most == 2


def test_the_floor_applies_once_what_waits_was_due_the_grace_ago() -> None:
    now = [1000.0]
    floor = Floor(lambda: 12.5, grace=15.0, clock=lambda: now[0])
    assert floor() == 0.0  # nothing waiting
    floor.due_since = 990.0  # due 10 s ago: a flood may still hold it back
    assert floor() == 0.0
    now[0] = 1004.9
    assert floor() == 0.0
    now[0] = 1005.0  # half of a 30 s interval: from now on no slower than the need
    assert floor() == 12.5
    floor.due_since = None
    assert floor() == 0.0


async def _a_crowd_holds_polls_back_for_the_grace_then_the_floor_holds() -> None:
    pace = Pace()
    pace.share = LEAST  # alone, one batch every 160 ms (8 * LEAST in flight)
    pace.started()
    floor = Floor(lambda: 10.0, grace=0.35)  # 10 a second needed, after 0.35 s
    floor.due_since = time.time()
    _, starts = await _most_at_once(pace, 8, 6, floor=floor)
    gaps = _gaps(starts)
    # Spaced by the share within the grace (starts at 0, 0.16, 0.32 s), then every 100 ms.
    assert min(gaps[:2]) >= PERIOD / (8 * LEAST) * 0.95, gaps
    assert 0.1 * 0.95 <= min(gaps[2:]) and max(gaps[2:]) < 0.15, gaps


def test_a_crowd_holds_polls_back_for_the_grace_then_the_floor_holds() -> None:
    asyncio.run(_a_crowd_holds_polls_back_for_the_grace_then_the_floor_holds())


async def _hold_up(pace: Pace, turns: int, *, at_once: int) -> None:
    for _ in range(turns):
        for _ in range(at_once):
            pace.started()
        time.sleep(0.02)  # a turn of the loop that holds it up, as a poll answer can
        for _ in range(at_once):
            pace.finished()
        await asyncio.sleep(PERIOD)


async def _a_late_loop_halves_the_share_while_requests_are_served() -> None:
    pace = Pace()
    task = asyncio.create_task(pace.measure(Beat(TaskStatus("loop-pace"))))
    try:
        await _hold_up(pace, 10, at_once=0)
        assert pace.lag > 0.004 and pace.share == 1.0  # late, but nobody waits for it
        await _hold_up(pace, 10, at_once=1)
        # Requests one by one: halved down to FEW (give or take a measurement on time between
        # them, which grows it by GROW), no further.
        assert FEW <= pace.share < 2 * FEW, pace.share
        await _hold_up(pace, 10, at_once=CROWD - 1)
        assert FEW <= pace.share < 2 * FEW, pace.share
        await _hold_up(pace, 10, at_once=CROWD)
        assert pace.share < FEW / 4  # a crowd: on towards LEAST
        # On time again: the share grows back, about 95 measurements on time (a second), and
        # only on time: on a loaded machine many come late (15 s once, with the suite's other
        # worker busy), hence the long bound.
        deadline = time.monotonic() + 60
        while pace.share < 1.0 and time.monotonic() < deadline:
            for _ in range(CROWD):
                pace.started()
            await asyncio.sleep(PERIOD)
            for _ in range(CROWD):
                pace.finished()
        assert pace.share == 1.0
    finally:
        task.cancel()


def test_full_concurrency_when_no_request_is_served() -> None:
    asyncio.run(_full_concurrency_when_no_request_is_served())


def test_allowance_follows_the_share_while_requests_are_served() -> None:
    asyncio.run(_allowance_follows_the_share_while_requests_are_served())


def test_below_one_in_flight_batches_are_spaced_out() -> None:
    asyncio.run(_below_one_in_flight_batches_are_spaced_out())


def test_the_floor_holds_whatever_the_share() -> None:
    asyncio.run(_the_floor_holds_whatever_the_share())


def test_a_late_loop_halves_the_share_while_requests_are_served() -> None:
    asyncio.run(_a_late_loop_halves_the_share_while_requests_are_served())
