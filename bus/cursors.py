"""Cursors and run records: small values the pollers keep in the `<STREAM>_cursors` bucket (an
inbound window, SMSC's `after_id`, when a provider-wide poll last ran), so a restart or a new
poller leader carries on where the last one stopped. NATS failures here are `StoreError`, which
the pollers never mistake for the provider failing.
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from bus.errors import StoreError

TIMEOUT = 5.0


class Cursors:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, name: str) -> str | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(name), TIMEOUT)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"cursor {name} not read: {exc or type(exc).__name__}") from None
        return entry.value.decode() if entry.value else None

    async def put(self, name: str, value: str) -> None:
        try:
            await asyncio.wait_for(self._kv.put(name, value.encode()), TIMEOUT)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"cursor {name} not saved: {exc or type(exc).__name__}") from None
