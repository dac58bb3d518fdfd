"""The supervisor restarts what fails or stalls, counts it, shows it, and stops in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import structlog

from bus import supervisor as supervised
from bus.backoff import Backoff, Calls
from bus.supervisor import Beat, Restart, Supervisor
from tests.support import await_for


def test_a_loop_that_raises_is_restarted_counted_and_shown_down_until_it_beats() -> None:
    async def scenario() -> None:
        restarts: list[str] = []
        supervisor = Supervisor(on_restart=restarts.append)
        runs = 0
        healthy = asyncio.Event()

        async def flaky(beat: Beat) -> None:
            nonlocal runs
            runs += 1
            if runs <= 2:
                raise RuntimeError(f"boom {runs}")
            await healthy.wait()
            beat()
            await asyncio.Event().wait()

        stop = supervisor.spawn("flaky", flaky, backoff=Backoff(0.01, 0.02))
        status = supervisor.statuses()["flaky"]
        await await_for(lambda: _true(runs == 3), what="the third run")
        assert ["flaky", "flaky"] == restarts
        assert (2, "RuntimeError: boom 2") == (status.restarts, status.last_error)
        assert status.down and status.down_since is not None
        healthy.set()
        await await_for(lambda: _true(not status.down), what="the loop to be up again")
        assert "running" == status.state and status.down_since is None
        await stop()
        assert "stopped" == status.state

    asyncio.run(scenario())


def test_a_loop_that_says_it_fails_is_down_until_restarted_and_a_restart_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop that runs but cannot do its work (the embedded server's watcher, its store
    refusing writes) is down however long it runs; its `Restart` is logged without a
    traceback."""
    monkeypatch.setattr(supervised, "HEALTHY_AFTER", 0.05)

    async def scenario() -> list[dict[str, object]]:
        restarts: list[str] = []
        supervisor = Supervisor(on_restart=restarts.append)
        runs = 0
        fixed = asyncio.Event()

        async def watcher(beat: Beat) -> None:
            nonlocal runs
            runs += 1
            beat()
            if runs == 1:
                beat.failing("the disk refuses writes")
                await fixed.wait()
                raise Restart("the disk takes writes again")
            await asyncio.Event().wait()

        with structlog.testing.capture_logs() as logs:
            stop = supervisor.spawn("watcher", watcher, backoff=Backoff(0.01, 0.02))
            status = supervisor.statuses()["watcher"]
            await await_for(lambda: _true(status.state == "failing"), what="failing")
            await asyncio.sleep(0.3)  # six times HEALTHY_AFTER: running is not working
            assert ("failing", "the disk refuses writes", 0) == (
                status.state, status.last_error, status.restarts,
            )  # fmt: skip
            assert status.down and status.down_since is not None
            fixed.set()
            await await_for(lambda: _true(runs == 2), what="the second run")
            await await_for(lambda: _true(not status.down), what="the loop to be up again")
            assert (["watcher"], "the disk takes writes again") == (restarts, status.last_error)
            await stop()
        return logs

    logs = asyncio.run(scenario())
    restarting = [line for line in logs if line["event"] == "background task restarting"]
    assert [{"task": "watcher", "reason": "the disk takes writes again"}] == [
        {k: line[k] for k in ("task", "reason")} for line in restarting
    ]
    assert not any("exc_info" in line for line in logs)


def test_a_loop_that_stops_beating_is_cancelled_and_restarted() -> None:
    async def scenario() -> None:
        supervisor = Supervisor()
        cancelled = 0
        runs = 0

        async def stuck(beat: Beat) -> None:
            nonlocal cancelled, runs
            runs += 1
            try:
                await asyncio.Event().wait()  # never beats
            except asyncio.CancelledError:
                cancelled += 1
                raise

        stop = supervisor.spawn("stuck", stuck, stall_after=0.3, backoff=Backoff(0.01, 0.02))
        status = supervisor.statuses()["stuck"]
        await await_for(lambda: _true(runs >= 2), what="a restart after the stall")
        assert cancelled >= 1
        assert "no progress for 0.3 s" == status.last_error
        await stop()

    asyncio.run(scenario())


def test_loops_stop_in_reverse_order_of_start_with_their_resources() -> None:
    async def scenario() -> list[str]:
        supervisor = Supervisor()
        order: list[str] = []

        def loop(name: str):  # type: ignore[no-untyped-def]
            async def run(beat: Beat) -> None:
                try:
                    await asyncio.Event().wait()
                finally:
                    order.append(name)

            return run

        async with contextlib.AsyncExitStack() as stack:
            stack.callback(order.append, "resource")
            for name in ("first", "second", "third"):
                stack.push_async_callback(supervisor.spawn(name, loop(name)))
            await asyncio.sleep(0.01)
        return order

    assert ["third", "second", "first", "resource"] == asyncio.run(scenario())


def test_a_loop_whose_cancellation_was_swallowed_stops_at_its_next_beat() -> None:
    """asyncio.wait_for before Python 3.12 drops a cancellation that arrives with the answer it
    waited for (nats-py's requests and fetches wait that way): the loop goes on as if nothing
    had been asked. It must still stop, at its next beat, not hold shutdown up for
    STOP_TIMEOUT."""

    async def scenario() -> tuple[float, str, list[str]]:
        supervisor = Supervisor()
        seen: list[str] = []

        async def swallowing(beat: Beat) -> None:
            give_up = time.monotonic() + 3.0  # so that the test ends, whatever the supervisor
            try:
                while time.monotonic() < give_up:
                    beat()
                    try:
                        await asyncio.sleep(0.05)
                    except asyncio.CancelledError:
                        seen.append("swallowed")  # as wait_for does when the answer is in
            finally:
                seen.append("ended")

        stop = supervisor.spawn("swallowing", swallowing)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await stop()
        return time.monotonic() - started, supervisor.statuses()["swallowing"].state, seen

    took, state, seen = asyncio.run(scenario())
    assert ["swallowed", "ended"] == seen
    assert took < 1.0, f"stopping took {took:.1f} s"
    assert "stopped" == state


def test_a_loop_trying_again_what_fails_stays_shown_failing_and_still_stops() -> None:
    """A turn without progress (`Beat.turn`) leaves a failing loop shown failing, so that
    /readyz and smsbus_task_up do not flap between tries, and raises a swallowed cancellation
    as a beat does."""

    async def scenario() -> tuple[list[str], float, list[str]]:
        supervisor = Supervisor()
        states: list[str] = []
        seen: list[str] = []
        status_of = supervisor.statuses

        async def retrying(beat: Beat) -> None:
            beat.failing("the write was refused")
            give_up = time.monotonic() + 3.0
            try:
                while time.monotonic() < give_up:
                    beat.turn()
                    states.append(status_of()["retrying"].state)
                    try:
                        await asyncio.sleep(0.02)
                    except asyncio.CancelledError:
                        seen.append("swallowed")
            finally:
                seen.append("ended")

        stop = supervisor.spawn("retrying", retrying)
        await await_for(lambda: _true(len(states) >= 5), what="five tries")
        started = time.monotonic()
        await stop()
        return states, time.monotonic() - started, seen

    states, took, seen = asyncio.run(scenario())
    assert {"failing"} == set(states)
    assert ["swallowed", "ended"] == seen
    assert took < 1.0, f"stopping took {took:.1f} s"


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, draw=lambda low, high: high)
    assert [1.0, 2.0, 4.0, 8.0, 8.0] == [backoff.failed() for _ in range(5)]
    backoff.succeeded()
    assert 1.0 == backoff.failed()
    jittered = Backoff(10.0, 10.0, jitter=0.5)
    assert all(5.0 <= jittered.failed() <= 10.0 for _ in range(100))


def test_calls_that_fail_together_back_off_once() -> None:
    calls = Calls(Backoff(1.0, 60.0, draw=lambda low, high: high))
    # Eight calls begun at 0 to 0.7 fail together at 1.0: one failure, not eight doublings.
    assert [1.0] + [None] * 7 == [
        calls.failed(started=i / 10, now=1.0 + i / 1000) for i in range(8)
    ]
    # The next call, begun once the failure was known, fails: the next doubling.
    assert 2.0 == calls.failed(started=2.0, now=2.5)
    # A call begun before that failure and failing after it saw it too.
    assert calls.failed(started=2.1, now=2.6) is None
    # A success, and a call in flight since before it fails: the provider failed anew, counted
    # from the first delay again.
    calls.succeeded()
    assert 1.0 == calls.failed(started=2.2, now=3.0)


async def _true(value: bool) -> bool:
    return value
