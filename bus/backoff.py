"""One back-off rule for everything that retries: a first delay, doubling with each consecutive
failure up to a cap, with jitter; a success resets it (CONTRACT.md section 5, "Polling rules").

Used by the supervisor's restarts, the spool drainer, the embedded server's restarts, start-up
retries and the pollers' failed calls (`Calls`: calls in flight together fail once), so they all
behave, and read, alike.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float
    cap: float
    jitter: float = 0.5  # a delay is drawn from [(1 - jitter) * d, d]
    failures: int = 0
    draw: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError("need 0 < first <= cap")

    @property
    def ceiling(self) -> float:
        """The delay before jitter that the next failure would get."""
        if self.failures == 0:
            return self.first
        return min(self.cap, self.first * 2.0 ** min(self.failures, 64))

    def failed(self) -> float:
        """Record a failure; the delay to wait before the next try."""
        ceiling = self.ceiling
        self.failures += 1
        return self.draw((1 - self.jitter) * ceiling, ceiling)

    def succeeded(self) -> None:
        self.failures = 0


@dataclass
class Calls:
    """The back-off of calls that may be in flight together (a poller's requests to one
    provider): a failed call counts only when it began after the last failure was recorded, or
    after a success since. Calls that fail together saw one failure of the provider; doubling
    for each would make a blip of a second, with eight requests in flight, wait eight doublings
    (30 s doubled seven times is capped at 600 s)."""

    backoff: Backoff
    failed_at: float = -math.inf  # when the last failure that counted was recorded

    def failed(self, started: float, now: float) -> float | None:
        """Record the failure of a call begun at `started`: the delay before the next call, or
        None when the call was in flight as the last failure was recorded (its wait stands)."""
        if started < self.failed_at:
            return None
        self.failed_at = now
        return self.backoff.failed()

    def succeeded(self) -> None:
        self.backoff.succeeded()
        self.failed_at = -math.inf
