"""A local, read-only mirror of the message-state bucket, kept current by a key-value watch.

Pollers read their tracked messages from it and the callback route reads `client_ref` and `phone`
from it, without a NATS round trip. It lags the bucket by the watch's delivery time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Iterator

import structlog
from nats.js.kv import KeyValue

from bus.messages import MessageState

log = structlog.get_logger("smsbus.index")

_DELETES = ("DEL", "PURGE")


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
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        watcher = await self._kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="smsbus-index")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

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
                held = self._keys.pop(entry.key, None)
                self._revisions.pop(entry.key, None)
                if held:
                    self._put(*held, None)
                continue
            try:
                state = MessageState.from_json(entry.value)
            except (ValueError, TypeError):
                log.warning("unreadable state in the bucket", key=entry.key)
                continue
            self._put(state.provider, state.message_id, state)
            self._keys[entry.key] = (state.provider, state.message_id)
            self._revisions[entry.key] = entry.revision


def _is_open(state: MessageState | None) -> int:
    return int(state is not None and state.tracked and not state.final)
