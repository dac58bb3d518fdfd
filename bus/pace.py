"""Background work gives way to requests: polls share the event loop with the callback route.

One process serves callbacks and polls (CONTRACT.md section 1), on one event loop. A poll round
at full pace (after a restart or an outage everything is due at once; a first cycle of a million
messages) keeps eight provider requests in flight, each answer a hundred reports to read, and
every turn of the loop then waits behind them: measured before this, callbacks fell from 4,600/s
to 300/s while 100,000 open messages were polled at full pace.

So the receiver marks each request (`foreground`), a supervised task measures how late the loop
wakes (`measure`), and while requests are being served and the loop runs late, a poller keeps
fewer requests in flight (`Gate`): the allowance halves each time the loop is late and grows
back while it is on time, down to one batch in flight and then to one batch every
`PERIOD / share`. With no request in the last QUIET seconds polls run at full pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

from bus.supervisor import Beat

PERIOD = 0.01  # how often the loop's lateness is measured
LATE = 0.001  # later than this, background work gives way
QUIET = 0.25  # seconds after the last request that polls go back to full pace
LEAST = 1 / 32  # the smallest share of its concurrency a poller keeps


class Pace:
    def __init__(self) -> None:
        self.lag = 0.0  # how late the loop woke last time, in seconds
        self.share = 1.0  # of each poller's concurrency, while requests are served
        self._request = -float("inf")

    def foreground(self) -> None:
        """A request is being served (the receiver calls this for each)."""
        self._request = time.monotonic()

    @property
    def contended(self) -> bool:
        return time.monotonic() - self._request < QUIET

    async def measure(self, beat: Beat) -> None:
        loop = asyncio.get_running_loop()
        while True:
            beat()
            start = loop.time()
            await asyncio.sleep(PERIOD)
            self.lag = max(0.0, loop.time() - start - PERIOD)
            if self.lag > LATE and self.contended:
                self.share = max(LEAST, self.share / 2)
            else:
                self.share = min(1.0, self.share * 1.25)

    def gate(self, concurrency: int) -> Gate:
        return Gate(self, concurrency)


class Gate:
    """Up to `concurrency` pieces of background work at once, fewer while requests wait."""

    def __init__(self, pace: Pace, concurrency: int) -> None:
        self._pace = pace
        self._most = concurrency
        self._busy = 0
        self._last = -float("inf")
        self._queue = asyncio.Lock()  # waiters in order; only the first one watches the pace
        self._freed = asyncio.Event()

    def _admits(self) -> bool:
        pace = self._pace
        if not pace.contended:
            return self._busy < self._most
        allowed = self._most * pace.share
        if allowed >= 1:
            return self._busy < int(allowed)
        # Less than one in flight: one at a time, spaced out.
        return self._busy == 0 and time.monotonic() - self._last >= PERIOD / allowed

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
