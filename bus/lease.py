"""Leadership leases in a JetStream key-value bucket: at most one replica polls a provider.

A lease is a key (the provider) whose value names its holder. The bucket's max age is half of
SMSBUS_LEASE_TTL, so the server itself removes a lease nobody renews: no replica compares its
clock with another's. The holder renews by compare-and-set on the key's revision every fifth of
the TTL (two renewals fit before expiry); anyone else tries to create the key every eighth of the
TTL, which succeeds only once it is gone. So a dead or partitioned holder is replaced within
5/8 of the TTL, leaving the rest for a NATS leader election, and a holder that cannot renew gives
the lease up (stops polling) before its key can expire and be taken.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

from bus.stream import LEASE_MAX_AGE as MAX_AGE  # the bucket's max age, as a part of the TTL

log = structlog.get_logger("smsbus.lease")

RENEW = 1 / 5  # of the TTL: the holder renews this often
RETRY = 1 / 8  # of the TTL: the others try to take it this often


def holder_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    """One provider's lease, as seen by this replica."""

    def __init__(self, bucket: KeyValue, key: str, holder: str, ttl: float) -> None:
        self.key = key
        self._bucket = bucket
        self._holder = holder.encode()
        self._ttl = ttl
        self._revision = 0
        self._valid_until = 0.0  # monotonic: when our last renewal could have expired

    @property
    def renew_every(self) -> float:
        return self._ttl * RENEW

    @property
    def retry_every(self) -> float:
        return self._ttl * RETRY

    @property
    def _call_timeout(self) -> float:
        # A call stuck in a NATS leader election must not eat the takeover time.
        return max(0.5, self.retry_every)

    def held(self) -> bool:
        return self._revision != 0 and time.monotonic() < self._valid_until

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or if the key is ours already: see `_reclaim`)."""
        started = time.monotonic()
        try:
            self._revision = await asyncio.wait_for(self._create(), self._call_timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self._reclaim(started)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("lease not acquired", lease=self.key, error=str(exc) or type(exc).__name__)
            return False
        self._valid_until = started + self._ttl * MAX_AGE
        return True

    async def _create(self) -> int:
        try:
            return await self._bucket.create(self.key, self._holder)
        except nats.js.errors.KeyNotFoundError:
            # nats-py's create met a delete marker (a lease given up, see `release`) and looked
            # at it again to write over it, by which time the bucket's max age had removed it:
            # the key is free, so create it.
            return await self._bucket.create(self.key, self._holder)

    async def renew(self) -> bool:
        """Keep the lease; False once it is lost (taken, expired, or unreachable too long)."""
        started = time.monotonic()
        try:
            self._revision = await asyncio.wait_for(
                self._bucket.update(self.key, self._holder, last=self._revision),
                self._call_timeout,
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self._reclaim(started)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("lease not renewed", lease=self.key, error=str(exc) or type(exc).__name__)
            return self.held()
        self._valid_until = started + self._ttl * MAX_AGE
        return True

    async def _reclaim(self, started: float) -> bool:
        """The key is not at the revision we know. A write of ours that timed out may have been
        applied after all (nats-py sends what it buffered once it reconnects): if the key still
        names us, it is ours, and renewing it keeps it; else someone else holds it."""
        self._revision = 0
        try:
            entry = await asyncio.wait_for(self._bucket.get(self.key), self._call_timeout)
            if entry.value != self._holder:
                return False
            self._revision = await asyncio.wait_for(
                self._bucket.update(self.key, self._holder, last=entry.revision),
                self._call_timeout,
            )
        except (TimeoutError, nats.errors.Error):
            self._revision = 0  # gone, taken, or unreachable: not ours now
            return False
        self._valid_until = started + self._ttl * MAX_AGE
        return True

    async def release(self) -> None:
        if self._revision:
            try:
                await asyncio.wait_for(self._bucket.delete(self.key, last=self._revision), 2)
            except (TimeoutError, nats.errors.Error):
                pass  # it expires on its own
            self._revision = 0
