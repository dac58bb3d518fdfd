"""A local, read-only mirror of the message-state bucket, kept current by a key-value watch.

Pollers read their tracked messages from it and the callback route reads `client_ref` and `phone`
from it, without a NATS round trip. It lags the bucket by the watch's delivery time.

It holds what those readers need, not the whole bucket, so that memory follows the open messages
rather than every message ever reported:
- an open tracked message is always held (the pollers schedule it; they end it with an expiry
  after SMSBUS_TRACK_TTL);
- a final state is let go at once where no poll reports the message again: SMSPilot, SMSTOWER
  and ePochta are asked only about open tracked messages. SMSC's history repeats reports for two
  days and an SMS-Pager mailing's report repeats its numbers, so there it stays, to tell a
  repeat from news;
- anything else not open is let go once RETAIN has passed since its last change.
A state the mirror does not hold is read from the bucket when it is written (one more round trip).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta

import structlog
from nats.js.kv import KeyValue

from bus.events import rfc3339, utcnow
from bus.messages import MessageState

log = structlog.get_logger("smsbus.index")

_DELETES = ("DEL", "PURGE")
# Providers whose polls never repeat a report about a message that is final.
_NO_REPEATS = frozenset({"smspilot", "smstower", "epochta"})
RETAIN = timedelta(days=3)  # longer than SMSC's 2-day history look-back
PRUNE_EVERY = 600.0


class MessageIndex:
    def __init__(
        self, kv: KeyValue, on_open: Callable[[str, int], None] = lambda p, n: None
    ) -> None:
        self._kv = kv
        self._on_open = on_open
        self._open: collections.Counter[str] = collections.Counter()
        self.listeners: list[Callable[[MessageState], None]] = []  # told of every new state
        self._by_provider: dict[str, dict[str, MessageState]] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._revisions: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="smsbus-index")
        self._pruner = asyncio.create_task(self._prune_every(), name="smsbus-index-prune")

    async def stop(self) -> None:
        for task in (self._task, self._pruner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @property
    def held(self) -> int:
        """How many states the mirror holds."""
        return len(self._keys)

    def prune(self, retain: timedelta = RETAIN) -> int:
        """Let go of every state that is not open and has not changed for `retain`."""
        cutoff = rfc3339(utcnow() - retain)
        old = [
            key
            for key, held in self._keys.items()
            if not _is_open(state := self.get(*held)) and (state is None or _older(state, cutoff))
        ]
        for key in old:
            self._forget(key)
        return len(old)

    async def _prune_every(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            if pruned := self.prune():
                log.info("message states let go", count=pruned, held=len(self._keys))

    def _forget(self, key: str) -> None:
        held = self._keys.pop(key, None)
        self._revisions.pop(key, None)
        if held:
            self._put(*held, None)

    def entry(self, key: str) -> tuple[MessageState | None, int]:
        """A bucket key's state and revision as last seen (None, 0 when not seen)."""
        held = self._keys.get(key)
        if held is None:
            return None, 0
        return self.get(*held), self._revisions.get(key, 0)

    def get(self, provider: str, message_id: str) -> MessageState | None:
        return self._by_provider.get(provider, {}).get(message_id)

    def of(self, provider: str) -> Iterator[MessageState]:
        return iter(list(self._by_provider.get(provider, {}).values()))

    def _put(self, provider: str, message_id: str, state: MessageState | None) -> None:
        states = self._by_provider.setdefault(provider, {})
        old = states.pop(message_id, None)
        if state is not None:
            states[message_id] = state
            for listener in self.listeners:
                listener(state)
        change = _is_open(state) - _is_open(old)
        if change:
            self._open[provider] += change
            self._on_open(provider, self._open[provider])

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the initial load is complete
                self.loaded.set()
                continue
            if entry.operation in _DELETES or not entry.value:
                self._forget(entry.key)
                continue
            try:
                state = MessageState.from_json(entry.value)
            except (ValueError, TypeError):
                log.warning("unreadable state in the bucket", key=entry.key)
                continue
            if state.final and state.provider in _NO_REPEATS:
                self._forget(entry.key)
                continue
            self._put(state.provider, state.message_id, state)
            self._keys[entry.key] = (state.provider, state.message_id)
            self._revisions[entry.key] = entry.revision


def _older(state: MessageState, cutoff: str) -> bool:
    return (state.updated_at or state.registered_at or "") < cutoff


def _is_open(state: MessageState | None) -> int:
    return int(state is not None and state.tracked and not state.final)
