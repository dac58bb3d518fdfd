"""When a tracked message is polled (CONTRACT.md section 2): one interval after registration,
then at doubling intervals up to the cap, until it expires SMSBUS_TRACK_TTL after `sent_at` (else
registration). Pure: every time is passed in, so the rules are tested on a clock of the test's
own, and every replica and restart agrees without storing a schedule."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

NEVER = float("inf")
TAKEN = -1.0  # an entry being polled: on no heap slot until `again` or `retry`


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
    """What `take` found due: ids to poll now, and ids whose tracking time is over."""

    poll: list[str]
    expired: list[str]


class Schedule:
    """Tracked messages by the time each is due. `polled` False: only expiries are scheduled
    (a provider whose statuses come from an account history)."""

    def __init__(
        self, *, first: float, interval: float, cap: float, ttl: float, polled: bool = True
    ) -> None:
        self._first, self._interval, self._cap, self._ttl = first, interval, cap, ttl
        self._polled = polled
        self._heap: list[tuple[float, str]] = []
        self._entries: dict[str, tuple[float, float, float]] = {}  # id: (when, base, expires)

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, message_id: str, *, registered: float, sent: float | None, after: float) -> None:
        """Due at its next poll time after `after`, or at its expiry if that comes first."""
        expires = (sent or registered) + self._ttl
        due = (
            next_poll(registered, after, self._first, self._interval, self._cap)
            if self._polled
            else NEVER
        )
        self._put(message_id, min(due, expires), registered, expires)

    def retry(self, message_id: str, at: float) -> None:
        """Due again at `at` (a failed call, a lost publish), keeping its expiry."""
        entry = self._entries.get(message_id)
        if entry is not None:
            self._put(message_id, min(at, entry[2]), entry[1], entry[2])

    def again(self, message_id: str, after: float) -> None:
        """Polled: due at its next poll time after `after`."""
        entry = self._entries.get(message_id)
        if entry is None:
            return
        _, registered, expires = entry
        due = next_poll(registered, after, self._first, self._interval, self._cap)
        self._put(message_id, min(due, expires), registered, expires)

    def drop(self, message_id: str) -> None:
        self._entries.pop(message_id, None)

    def _put(self, message_id: str, when: float, registered: float, expires: float) -> None:
        self._entries[message_id] = (when, registered, expires)
        heapq.heappush(self._heap, (when, message_id))

    def take(self, now: float, batch: int, horizon: float) -> Due:
        """Take what is due at `now`. A last, partial batch is topped up with ids due by
        `horizon`: polling those a little early saves a request. Taken ids leave the schedule
        until pushed again (`again`, `retry`); expired ones for good."""
        poll: list[str] = []
        expired: list[str] = []
        heap = self._heap
        while heap and (
            heap[0][0] <= now or (poll and len(poll) % batch and heap[0][0] <= horizon)
        ):
            when, message_id = heapq.heappop(heap)
            entry = self._entries.get(message_id)
            if entry is None or entry[0] != when:
                continue  # superseded, or dropped
            if now >= entry[2]:
                expired.append(message_id)
                del self._entries[message_id]
            elif self._polled:
                poll.append(message_id)
                self._entries[message_id] = (TAKEN, entry[1], entry[2])
            else:
                self._entries[message_id] = (NEVER, entry[1], entry[2])
                self._put(message_id, entry[2], entry[1], entry[2])
        return Due(poll, expired)
