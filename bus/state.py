"""Message state: the `<STREAM>_messages` bucket, its local mirror, and the rules for reading and
writing it.

Reads go to the mirror first and to the bucket when the mirror does not hold the key, so a state
written a moment ago by another replica is never missed (CONTRACT.md section 3, read your writes).
Writes are compare-and-set on the key's revision, starting from the mirror's copy (no read when it
is current), and what this process wrote is put into the mirror as soon as it is acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats.errors
import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from bus.connection import Connection
from bus.events import Event
from bus.follow import Follower
from bus.index import MessageIndex
from bus.messages import MessageState, TrackItem, kv_key, message_key, register

CAS_ATTEMPTS = 50
WRITES_AT_ONCE = 64  # concurrent writes of one batch of registrations
LOOKUP_TIMEOUT = 1.0


async def read_state(kv: KeyValue, key: str) -> tuple[MessageState | None, int]:
    """A key's state and revision; (None, 0) when there is none. NATS errors pass through."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    return (MessageState.from_json(entry.value) if entry.value else None), entry.revision


class States:
    def __init__(
        self,
        conn: Connection,
        kv: KeyValue,
        bucket: str,
        on_open: Callable[[str, int], None] = lambda p, n: None,
    ) -> None:
        self._conn = conn
        self.kv = kv
        self.mirror = MessageIndex(bucket, on_open=on_open, floor=lambda: self.follower.last)
        self.follower = Follower(
            conn,
            "state-mirror",
            f"KV_{bucket}",
            f"$KV.{bucket}.>",
            self.mirror.apply,
            on_reset=self.mirror.clear,
        )

    async def read(self, key: str) -> tuple[MessageState | None, int]:
        """The bucket's copy of a key. NATS errors pass through."""
        return await read_state(self.kv, key)

    async def lookup(self, provider: str, message_key: str) -> MessageState | None:
        """The state of a message: the mirror's, else the bucket's. When the bucket cannot be
        read in time (NATS is away) the answer is None: the caller goes on without it."""
        held = self.mirror.get(provider, message_key)
        if held is not None or not self._conn.is_connected:
            return held
        try:
            key = kv_key(provider, message_key)
            state, _ = await asyncio.wait_for(read_state(self.kv, key), LOOKUP_TIMEOUT)
        except (TimeoutError, nats.errors.Error):
            return None
        return state

    async def recorded(self, event: Event) -> bool:
        """Does the bucket's state of this status event's message record its fact already?
        False when it cannot be read."""
        data = orjson.loads(event.payload)["data"]
        provider = data["provider"]
        key = kv_key(provider, message_key(provider, data["message_id"], data.get("phone")))
        try:
            state, _ = await read_state(self.kv, key)
        except (TimeoutError, nats.errors.Error):
            return False
        return state is not None and state.records(event.id)

    async def update(
        self, key: str, change: Callable[[MessageState | None], MessageState]
    ) -> MessageState:
        """Change and write one key with compare-and-set; the first try starts from the mirror's
        copy (a stale copy costs one retry). Raises NATS errors; contention past CAS_ATTEMPTS is
        a nats.errors.Error too."""
        for attempt in range(CAS_ATTEMPTS):
            if attempt == 0:
                current, revision = self.mirror.entry(key)
            else:
                current, revision = await read_state(self.kv, key)
            new = change(current)
            if new == current:
                return new
            try:
                if revision:
                    revision = await self.kv.update(key, new.to_json(), last=revision)
                else:
                    revision = await self.kv.create(key, new.to_json())
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone else wrote it; read again
            self.mirror.observe(key, new, revision)
            return new
        raise nats.errors.Error(f"{key}: still contended after {CAS_ATTEMPTS} attempts")

    async def register(self, items: list[TrackItem], at: str) -> None:
        """Apply registrations (at most WRITES_AT_ONCE writes in flight); NATS errors pass
        through once every write has finished or failed."""
        gate = asyncio.Semaphore(WRITES_AT_ONCE)

        async def one(item: TrackItem) -> None:
            async with gate:
                key = kv_key(item.provider, item.message_id)
                await self.update(key, lambda s: register(s, item, at))

        results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
