"""When a tracked message is polled (CONTRACT.md section 2): one interval after registration,
then at doubling intervals up to the cap, until it expires SMSBUS_TRACK_TTL after `sent_at` (else
registration). Pure: every time is passed in, so the rules are tested on a clock of the test's
own, and every replica and restart agrees without storing a schedule.

Built to hold a million messages in little memory: the schedule keeps, for each message, only
the whole second it is due in, and messages are kept by that second (one list per second that
has any), so the per-message cost is one dict entry and one list slot. When a message was
registered and sent comes from `timing` (the state mirror), not from a copy here.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

# A message's registration and sent_at (seconds since the epoch, None when unknown), or None
# when it is no longer open.
Timing = Callable[[str], "tuple[float | None, float | None] | None"]

_TAKEN: list[str] = []  # being polled: due again only when put back (`again`, `retry`)


def next_poll(base: float, after: float, first: float, interval: float, cap: float) -> float:
    """The first poll time strictly after `after`, for a message registered at `base`.

    Polls fall at base+first, then each gap doubles from `interval` until it reaches `cap`.
    """
    t = base + first
    gap = interval
    while t <= after and gap < cap:
        t += gap
        gap = min(gap * 2, cap)
    if t <= after:  # in the capped phase: jump whole gaps at once
        steps = int((after - t) // cap) + 1
        t += steps * cap
    return t


@dataclass(frozen=True, slots=True)
class Due:
    """What `take` found due: ids to poll now, and ids whose tracking time is over; `since`,
    the second the earliest of those to poll was due in (None when there are none)."""

    poll: list[str]
    expired: list[str]
    since: int | None = None


class Schedule:
    """Tracked messages by the second each is due in (a message is never taken before it is
    due, and at most a second after). `polled` False: only expiries are scheduled (a provider
    whose statuses come from an account history)."""

    def __init__(
        self,
        *,
        first: float,
        interval: float,
        cap: float,
        ttl: float,
        timing: Timing,
        polled: bool = True,
    ) -> None:
        self._first, self._interval, self._cap, self._ttl = first, interval, cap, ttl
        self._timing = timing
        self._polled = polled
        # id: the list of the second it is due in (shared, so an id costs no object of its own),
        # or _TAKEN. A list may also hold ids that have moved on: `take` skips those.
        self._due: dict[str, list[str]] = {}
        self._slots: dict[int, list[str]] = {}  # second: its list
        self._seconds: list[int] = []  # a heap of the keys of _slots

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._due

    def __len__(self) -> int:
        return len(self._due)

    def push(self, message_id: str, *, after: float) -> bool:
        """Due at its next poll time after `after`, or at its expiry if that comes first. False
        (and not scheduled) when `timing` does not know it as open."""
        return self._schedule(message_id, after)

    def again(self, message_id: str, after: float) -> None:
        """Polled: due at its next poll time after `after`."""
        if message_id in self._due:
            self._schedule(message_id, after)

    def retry(self, message_id: str, at: float) -> None:
        """Due again at `at` (a failed call, a lost expiry); expired then if its time is over."""
        if message_id in self._due and self._expiry(message_id) is not None:
            self._put(message_id, math.ceil(at))

    def drop(self, message_id: str) -> None:
        self._due.pop(message_id, None)

    def untake(self, message_id: str, at: float) -> None:
        """An id still taken is due again at `at`: its poll was never finished (a new term of
        the poller starts while a batch of the last one was cancelled before it began)."""
        if self._due.get(message_id) is _TAKEN:
            self.retry(message_id, at)

    def _schedule(self, message_id: str, after: float) -> bool:
        times = self._expiry(message_id)
        if times is None:
            self._due.pop(message_id, None)
            return False
        registered, expires = times
        at = (
            next_poll(registered, after, self._first, self._interval, self._cap)
            if self._polled
            else expires
        )
        self._put(message_id, math.ceil(min(at, expires)))
        return True

    def _expiry(self, message_id: str) -> tuple[float, float] | None:
        """When the message was registered, and when its tracking ends."""
        times = self._timing(message_id)
        if times is None:
            return None
        registered, sent = times
        if registered is None:
            registered = sent if sent is not None else 0.0
        return registered, (sent if sent is not None else registered) + self._ttl

    def _put(self, message_id: str, second: int) -> None:
        ids = self._slots.get(second)
        if ids is None:
            ids = self._slots[second] = []
            heapq.heappush(self._seconds, second)
        elif self._due.get(message_id) is ids:
            return  # there already
        ids.append(message_id)
        self._due[message_id] = ids

    def take(self, now: float, batch: int, horizon: float, limit: int | None = None) -> Due:
        """Take what is due at `now`, at most `limit` ids to poll (or, polled, to expire: each
        is polled a last time first). A last, partial batch is topped up with ids due by
        `horizon`: polling those a little early saves a request. Taken ids leave the schedule
        until put back (`again`, `retry`); expired ones for good."""
        poll: list[str] = []
        expired: list[str] = []
        counted = expired if self._polled else []
        since: int | None = None
        due, slots, seconds = self._due, self._slots, self._seconds
        while seconds and (limit is None or len(poll) + len(counted) < limit):
            second = seconds[0]
            if second > now and not (poll and len(poll) % batch and second <= horizon):
                break
            ids = slots[second]
            while ids and (limit is None or len(poll) + len(counted) < limit):
                if second > now and not len(poll) % batch:
                    break  # topped up
                message_id = ids.pop()
                if due.get(message_id) is not ids:
                    continue  # moved on, dropped or taken
                times = self._expiry(message_id)
                if times is None:
                    del due[message_id]  # no longer open
                elif now >= times[1]:
                    expired.append(message_id)
                    del due[message_id]
                elif self._polled:
                    if not poll:
                        since = second  # the seconds are walked in order: the earliest
                    poll.append(message_id)
                    due[message_id] = _TAKEN
                else:  # only its expiry counts; it is not that yet
                    self._put(message_id, math.ceil(times[1]))
            if ids:
                break
            heapq.heappop(seconds)
            del slots[second]
        return Due(poll, expired, since)
