"""Supervised background work: every long-running loop of a process runs here.

A loop that raises is logged once with its name and traceback (a `Restart`, the loop's own
reason, in one line), counted in `smsbus_task_restarts_total{task}`, shown in /readyz as down,
and started again after a back-off; a loop that stops beating for longer than its `stall_after`
is cancelled and restarted the same way. A loop that runs but cannot do its work says so
(`Beat.failing`) and is shown down until it beats again. A loop that returns is done (a one-shot
job). Shutdown cancels each loop and waits for it:
`spawn` hands back a stop coroutine for the caller's exit stack, so loops stop in reverse order
of start, interleaved with the resources they use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.backoff import Backoff
from bus.events import rfc3339, utcnow

log = structlog.get_logger("smsbus.supervisor")

HEALTHY_AFTER = 10.0  # a restarted loop that runs this long is up, beats or not
WATCH_EVERY = 0.25
STOP_TIMEOUT = 10.0


@dataclass
class TaskStatus:
    """What /readyz shows of one supervised loop."""

    name: str
    state: str = "running"  # running | failing | restarting | stalled | done | stopped
    restarts: int = 0
    last_error: str | None = None
    down_since: str | None = None

    @property
    def down(self) -> bool:
        return self.state in ("failing", "restarting", "stalled")

    def up(self) -> None:
        if self.down:
            self.state = "running"
            self.down_since = None

    def public(self) -> dict[str, object]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "down_since": self.down_since,
        }


class Restart(Exception):
    """Raised by a loop to be started again for a reason of its own, which says it all: logged
    in one line, without a traceback."""


class Beat:
    """Handed to a loop: calling it says "I am making progress". It also marks a restarted loop
    as up again, and stops a loop that was asked to stop and did not: a call can drop a
    cancellation (before Python 3.12, `asyncio.wait_for`, which nats-py's requests and fetches
    use, drops one that arrives as the awaited answer does; nats-py's flush drops one outright),
    and the loop would go on, holding shutdown up for STOP_TIMEOUT. A cancellation requested of
    the calling task and not yet honoured is raised here, where every loop passes on each
    turn."""

    __slots__ = ("last", "_status")

    def __init__(self, status: TaskStatus) -> None:
        self.last = time.monotonic()
        self._status = status

    def __call__(self) -> None:
        self.turn()
        self.last = time.monotonic()
        if self._status.down:
            self._status.up()

    def turn(self) -> None:
        """A turn that makes no progress (a loop trying again what failed): a pending
        cancellation is raised as by a beat, and the loop stays shown as it is."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    def failing(self, error: str) -> None:
        """Say "I run, but cannot do my work": /readyz shows the loop down, with `error`, until
        it beats again or is restarted."""
        status = self._status
        status.state = "failing"
        status.last_error = error[:300]
        status.down_since = status.down_since or rfc3339(utcnow())


Loop = Callable[[Beat], Coroutine[Any, Any, None]]


@dataclass
class _Supervised:
    status: TaskStatus
    run: Loop
    stall_after: float | None
    backoff: Backoff
    beat: Beat
    outer: asyncio.Task[None] | None = None
    inner: asyncio.Task[None] | None = None
    started: float = field(default_factory=time.monotonic)
    stalled: bool = False


class Supervisor:
    def __init__(self, on_restart: Callable[[str], None] = lambda name: None) -> None:
        self._on_restart = on_restart
        self._tasks: dict[str, _Supervised] = {}
        self._watchdog: asyncio.Task[None] | None = None

    def statuses(self) -> dict[str, TaskStatus]:
        return {name: s.status for name, s in self._tasks.items()}

    def spawn(
        self,
        name: str,
        run: Loop,
        *,
        stall_after: float | None = None,
        backoff: Backoff | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """Start `run` under supervision; return the coroutine function that stops it."""
        held = self._tasks.get(name)
        if held is not None and held.outer is not None:
            raise ValueError(f"task {name} is already running")
        status = TaskStatus(name)
        task = _Supervised(status, run, stall_after, backoff or Backoff(0.5, 30.0), Beat(status))
        self._tasks[name] = task
        task.outer = asyncio.create_task(self._keep(task), name=f"smsbus-{name}")
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="smsbus-watchdog")

        async def stop() -> None:
            await self._stop(task)

        return stop

    async def _keep(self, task: _Supervised) -> None:
        status = task.status
        while True:
            task.beat.last = task.started = time.monotonic()
            task.stalled = False
            task.inner = asyncio.create_task(task.run(task.beat), name=f"smsbus-{status.name}-run")
            try:
                await asyncio.shield(task.inner)
            except asyncio.CancelledError:
                if not task.stalled:
                    raise  # shutdown; _stop cancels the inner task too
                status.state = "stalled"
                error = f"no progress for {task.stall_after:g} s"
                log.error("background task stalled; restarting", task=status.name)
            except Restart as exc:
                status.state = "restarting"
                error = str(exc)[:300]
                log.error("background task restarting", task=status.name, reason=error)
            except Exception as exc:
                status.state = "restarting"
                error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("background task failed; restarting", task=status.name)
            else:
                status.state = "done"
                return
            status.restarts += 1
            status.last_error = error
            status.down_since = status.down_since or rfc3339(utcnow())
            self._on_restart(status.name)
            await asyncio.sleep(task.backoff.failed())

    async def _watch(self) -> None:
        """Cancel loops that stopped beating; count a long enough run as a recovery."""
        while True:
            await asyncio.sleep(WATCH_EVERY)
            now = time.monotonic()
            for task in list(self._tasks.values()):
                inner = task.inner
                if inner is None or inner.done():
                    continue
                if task.stall_after is not None and now - task.beat.last > task.stall_after:
                    task.stalled = True
                    inner.cancel()
                elif now - task.started > HEALTHY_AFTER:
                    task.backoff.succeeded()
                    if task.status.state != "failing":  # it runs; it has not said it works
                        task.status.up()

    async def _stop(self, task: _Supervised) -> None:
        running = [t for t in (task.inner, task.outer) if t is not None and not t.done()]
        for each in running:
            each.cancel()
        if running:
            _, pending = await asyncio.wait(running, timeout=STOP_TIMEOUT)
            if pending:
                log.warning("background task did not stop in time", task=task.status.name)
        for each in running:
            if each.done() and not each.cancelled():
                with contextlib.suppress(Exception):
                    each.result()
        task.outer = None
        if task.status.state != "done":
            task.status.state = "stopped"
        if self._watchdog is not None and all(t.outer is None for t in self._tasks.values()):
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
