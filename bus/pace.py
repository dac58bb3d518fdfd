"""Background work gives way to requests: polls share the event loop with the callback route.

One process serves callbacks and polls (CONTRACT.md section 1), on one event loop. A poll round
at full pace (after a restart or an outage everything is due at once; a first cycle of a million
messages) keeps eight provider requests in flight, each answer a hundred reports to read, and
every turn of the loop then waits behind them: measured before this, callbacks fell from 4,600/s
to 300/s while 100,000 open messages were polled at full pace.

So the receiver counts the requests it is serving (`started`, `finished`), a supervised task
measures how late the loop wakes (`measure`), and while requests crowd in (CROWD or more at once
within one measurement) and the loop runs late, a poller keeps fewer requests in flight (`Gate`):
the allowance halves each time, and grows back slowly (GROW a measurement, about a second from the
least to all) while the loop is on time. Requests that come one by one while the loop runs late (a
callback now and then during a pass at full pace) halve it down to FEW, two of a poller's eight
requests, no further: a request waits for a dozen turns of the loop (its bucket read, its event and
its state, each a round trip through tasks), and with eight answers to read each turn one callback
took 42 to 65 ms where it takes 3 when nothing is polled; with two, 17 to 21 ms, the pass longer by
a tenth at most (`bench/pass_latency.py`). Halving further for them would slow a million-message
cycle several times over, and a loop on time (a provider slow to answer, not our CPU, holding the
pace) keeps the full allowance. The least is one batch in flight and then one batch every `PERIOD /
share`. Once what a poller waits to poll was due half an interval ago (`Floor`), never fewer
batches a second than its floor, enough to poll every open message once an interval: a flood of
callbacks delays a poll by about half its interval (as late as a top-up polls one early), and a
flood shorter than that has the loop nearly to itself, the polls catching up at full pace after
it. A floor over FLOOR a second (a million open messages polled every 300 s need 33) is held at
FLOOR, so callbacks keep most of the loop even then, and polls fall further behind while the flood
lasts. With no request in the last QUIET seconds polls run at full pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import TracebackType

from bus.supervisor import Beat

PERIOD = 0.01  # how often the loop's lateness is measured
LATE = 0.001  # later than this, background work gives way
CROWD = 4  # requests served at once within a measurement that make it give way
GROW = 1.05  # the share's growth a measurement while requests do not crowd in
QUIET = 0.25  # seconds after the last request that polls go back to full pace
LEAST = 1 / 128  # the smallest share of its concurrency a poller keeps
FEW = 1 / 4  # ... while requests come one by one (two of a poller's eight requests)
FLOOR = 1 / (4 * PERIOD)  # a poller's floor is kept up to this many pieces a second


class Pace:
    def __init__(self) -> None:
        self.lag = 0.0  # how late the loop woke last time, in seconds
        self.share = 1.0  # of each poller's concurrency, while requests are served
        self.serving = 0  # requests being served now
        self._crowd = 0  # the most served at once since the last measurement
        self._request = -float("inf")

    def started(self) -> None:
        """A request is being served (the receiver calls this for each, then `finished`)."""
        self._request = time.monotonic()
        self.serving += 1
        if self.serving > self._crowd:
            self._crowd = self.serving

    def finished(self) -> None:
        self.serving -= 1

    @property
    def contended(self) -> bool:
        return self.serving > 0 or time.monotonic() - self._request < QUIET

    async def measure(self, beat: Beat) -> None:
        loop = asyncio.get_running_loop()
        while True:
            beat()
            start = loop.time()
            await asyncio.sleep(PERIOD)
            self.lag = max(0.0, loop.time() - start - PERIOD)
            crowd, self._crowd = self._crowd, self.serving
            late = self.lag > LATE
            if late and crowd >= CROWD:
                self.share = max(LEAST, self.share / 2)
            elif late and crowd:  # requests one by one: down to FEW, or back up to it
                self.share = (
                    max(FEW, self.share / 2) if self.share > FEW else min(FEW, self.share * GROW)
                )
            else:
                self.share = min(1.0, self.share * GROW)

    def gate(self, concurrency: int, floor: Callable[[], float] = lambda: 0.0) -> Gate:
        return Gate(self, concurrency, floor)


class Floor:
    """A poller's floor (Gate's `floor`): none while the work waiting to start was due less
    than `grace` ago, so that a spell of requests shorter than that has the loop to itself and
    the work catches up after it; from then on `needed()`, the pieces a second that keep it from
    falling further behind."""

    def __init__(
        self, needed: Callable[[], float], grace: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._needed = needed
        self._grace = grace
        self._clock = clock
        self.due_since: float | None = None  # when the earliest piece waiting was due

    def __call__(self) -> float:
        since = self.due_since
        if since is None or self._clock() - since < self._grace:
            return 0.0
        return self._needed()


class Gate:
    """Up to `concurrency` pieces of background work at once, fewer while requests wait, but no
    fewer than `floor()` pieces a second."""

    def __init__(self, pace: Pace, concurrency: int, floor: Callable[[], float]) -> None:
        self._pace = pace
        self._most = concurrency
        self._floor = floor
        self._busy = 0
        self._last = -float("inf")
        self._queue = asyncio.Lock()  # waiters in order; only the first one watches the pace
        self._freed = asyncio.Event()

    def _admits(self) -> bool:
        pace = self._pace
        if self._busy >= self._most:
            return False
        if not pace.contended:
            return True
        allowed = self._most * pace.share
        if allowed >= 1 and self._busy < int(allowed):
            return True
        waited = time.monotonic() - self._last
        # Less than one in flight: one at a time, spaced out.
        if allowed < 1 and self._busy == 0 and waited >= PERIOD / allowed:
            return True
        # Whatever the share, a start as often as the floor needs (up to FLOOR a second).
        least = min(self._floor(), FLOOR)
        return least > 0 and waited >= 1 / least

    async def __aenter__(self) -> None:
        async with self._queue:
            while not self._admits():
                self._freed.clear()
                with contextlib.suppress(TimeoutError):  # the pace changes without a release
                    await asyncio.wait_for(self._freed.wait(), PERIOD / 2)
            self._busy += 1
            self._last = time.monotonic()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._busy -= 1
        self._freed.set()
