"""Cursors and run records: small values the pollers keep in the `<STREAM>_cursors` bucket (an
inbound window, SMSC's `after_id`, when a provider-wide poll last ran), so a restart or a new
poller leader carries on where the last one stopped. NATS failures here are `StoreError`, which
the pollers never mistake for the provider failing.

Every replica follows the bucket (a `Follower`, as the state mirror follows its own) and knows
each cursor's last value, whoever wrote it. A cursor the bucket no longer has (a NATS server back
on an empty store, the bucket deleted) is that value, and is written back: without it an inbound
window would look back a whole day again and publish every message in it a second time, with no
duplicate window left to drop them; and the poller's leadership, lost with the bucket's
neighbours, may well come back on another replica.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

from bus import wire
from bus.connection import Connection
from bus.errors import StoreError
from bus.follow import Follower

log = structlog.get_logger("smsbus.cursors")

TIMEOUT = 5.0


class Cursors:
    def __init__(self, conn: Connection, kv: KeyValue, bucket: str) -> None:
        self._kv = kv
        self._prefix = f"$KV.{bucket}."
        self._known: dict[str, str] = {}  # each cursor's last value, by name
        self.follower = Follower.of_bucket(conn, "cursor-mirror", bucket, self._apply)

    def _apply(self, subject: bytes, data: bytes, headers: bytes, revision: int) -> None:
        """One write to the bucket, as the follower delivers it."""
        name = subject[len(self._prefix) :].decode(errors="replace")
        if data and not wire.raw_removes_key(headers):
            self._known[name] = data.decode(errors="replace")

    async def get(self, name: str) -> str | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(name), TIMEOUT)
        except nats.js.errors.KeyNotFoundError:
            known = self._known.get(name)
            if known is not None:
                log.warning("cursor missing from its bucket; writing back the last one known",
                            cursor=name)  # fmt: skip
                await self.put(name, known)
            return known
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"cursor {name} not read: {exc or type(exc).__name__}") from None
        value = entry.value.decode() if entry.value else None
        if value is not None:
            self._known[name] = value
        return value

    async def put(self, name: str, value: str) -> None:
        try:
            await asyncio.wait_for(self._kv.put(name, value.encode()), TIMEOUT)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"cursor {name} not saved: {exc or type(exc).__name__}") from None
        self._known[name] = value
