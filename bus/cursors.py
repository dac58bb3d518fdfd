"""Cursors and run records: small values the pollers keep in the `<STREAM>_cursors` bucket (an
inbound window, SMSC's `after_id`, when a provider-wide poll last ran), so a restart or a new
poller leader carries on where the last one stopped. NATS failures here are `StoreError`, which
the pollers never mistake for the provider failing.

A cursor the bucket no longer has, where this process knows one (it read or saved it: a NATS
server back on an empty store, the bucket deleted), is the last one this process knew, and is
written back: without it an inbound window would look back a whole day again and publish every
message in it a second time, with no duplicate window left to drop them. A cursor another
replica moved since is older than the bucket's was, so what it makes read again is read again
from the provider, never skipped.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import structlog
from nats.js.kv import KeyValue

from bus.errors import StoreError

log = structlog.get_logger("smsbus.cursors")

TIMEOUT = 5.0


class Cursors:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._known: dict[str, str] = {}  # the last value read or saved, by name

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
