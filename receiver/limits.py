"""How many dead letters one HTTP peer may leave (SMSBUS_DEADLETTER_RATE a minute): a token
bucket per peer, so a peer sending junk in a loop cannot fill the NATS volume. The peer is the
address the allowlist judges (behind a trusted proxy, the nearest untrusted hop)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PEERS = 10_000  # peers remembered; the one seen longest ago is forgotten first


class PerPeerRate:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(per_minute)
        self._refill = per_minute / 60.0  # tokens a second
        self._clock = clock
        self._buckets: OrderedDict[str | None, tuple[float, float]] = OrderedDict()

    def allow(self, peer: str | None) -> bool:
        """Take one token for `peer`; False when it has none left."""
        if self._capacity <= 0:
            return False
        now = self._clock()
        tokens, at = self._buckets.pop(peer, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - at) * self._refill)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_PEERS:
            self._buckets.popitem(last=False)
        return allowed
