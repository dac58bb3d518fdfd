"""A local, read-only mirror of the message-state bucket, fed in order by a `Follower`.

Pollers read their tracked messages from it and the callback route reads `client_ref` and `phone`
from it, without a NATS round trip. It lags the bucket by the watch's delivery time; this
process's own writes are put into it as soon as they are acknowledged (`observe`), and a reader
that misses here reads the bucket (bus.state), so a registration is never missed.

It holds what those readers need, not the whole bucket, so that memory follows the open messages
rather than every message ever reported:
- an open tracked message is always held (the pollers schedule it; they end it with an expiry
  after SMSBUS_TRACK_TTL);
- a final state is let go at once where no poll reports the message again: SMSPilot, SMSTOWER
  and ePochta are asked only about open tracked messages. SMSC's history repeats reports for two
  days and an SMS-Pager mailing's report repeats its numbers, so there it stays, to tell a
  repeat from news;
- anything else not open is let go once RETAIN has passed since its last change.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Callable, Iterator
from datetime import timedelta

import structlog
from nats.aio.msg import Msg

from bus.events import rfc3339, utcnow
from bus.messages import MessageState
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.index")

_DELETES = ("DEL", "PURGE")
# nats-server 2.11+ marks keys removed by the server itself (max age, purge) with this header.
_MARKER_DELETES = ("MaxAge", "Purge", "Remove")
# Providers whose polls never repeat a report about a message that is final.
_NO_REPEATS = frozenset({"smspilot", "smstower", "epochta"})
RETAIN = timedelta(days=3)  # longer than SMSC's 2-day history look-back
PRUNE_EVERY = 600.0


class MessageIndex:
    def __init__(
        self,
        bucket: str,
        on_open: Callable[[str, int], None] = lambda p, n: None,
        floor: Callable[[], int] = lambda: 0,
    ) -> None:
        self._prefix = f"$KV.{bucket}."
        self._on_open = on_open
        self._floor = floor  # the last bucket revision the follower has applied
        self._open: collections.Counter[str] = collections.Counter()
        self.listeners: list[Callable[[MessageState], None]] = []  # told of every new state
        self._by_provider: dict[str, dict[str, MessageState]] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._revisions: dict[str, int] = {}
        self._own: list[int] = []  # a heap: revisions this process wrote and `observe`d

    @property
    def held(self) -> int:
        """How many states the mirror holds."""
        return len(self._keys)

    def entry(self, key: str) -> tuple[MessageState | None, int]:
        """A bucket key's state and revision as last seen (None, 0 when not held)."""
        held = self._keys.get(key)
        if held is None:
            return None, 0
        return self.get(*held), self._revisions.get(key, 0)

    def get(self, provider: str, message_id: str) -> MessageState | None:
        return self._by_provider.get(provider, {}).get(message_id)

    def of(self, provider: str) -> Iterator[MessageState]:
        return iter(list(self._by_provider.get(provider, {}).values()))

    def apply(self, msg: Msg) -> None:
        """One message of the bucket's stream, as the follower delivers it (in order)."""
        revision = msg.metadata.sequence.stream
        own = self._own
        while own and own[0] < revision:  # superseded before the watch got to them
            heapq.heappop(own)
        if own and own[0] == revision:
            heapq.heappop(own)
            return  # our own write: applied when it was acknowledged
        key = msg.subject[len(self._prefix) :]
        headers = msg.headers or {}
        if (
            headers.get("KV-Operation") in _DELETES
            or headers.get("Nats-Marker-Reason") in _MARKER_DELETES
            or not msg.data
        ):
            self._forget(key)
            return
        try:
            state = MessageState.from_json(msg.data)
        except (ValueError, TypeError):
            log.warning("unreadable state in the bucket", key=key)
            return
        self._hold(key, state, revision)

    def observe(self, key: str, state: MessageState, revision: int) -> None:
        """This process wrote `state` at `revision`: hold it now rather than when the watch
        delivers it. A revision the follower has already passed is old news."""
        if revision <= self._floor() or revision <= self._revisions.get(key, 0):
            return
        heapq.heappush(self._own, revision)
        self._hold(key, state, revision)

    def clear(self) -> None:
        """Forget everything (the bucket's stream was recreated)."""
        for key in list(self._keys):
            self._forget(key)
        self._own.clear()

    def _hold(self, key: str, state: MessageState, revision: int) -> None:
        if revision < self._revisions.get(key, 0):
            return
        if state.final and state.provider in _NO_REPEATS:
            self._forget(key)
            return
        self._put(state.provider, state.message_id, state)
        self._keys[key] = (state.provider, state.message_id)
        self._revisions[key] = revision

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

    async def prune_every(self, beat: Beat) -> None:
        while True:
            beat()
            await asyncio.sleep(PRUNE_EVERY)
            if pruned := self.prune():
                log.info("message states let go", count=pruned, held=len(self._keys))

    def _forget(self, key: str) -> None:
        held = self._keys.pop(key, None)
        self._revisions.pop(key, None)
        if held:
            self._put(*held, None)

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


def _older(state: MessageState, cutoff: str) -> bool:
    return (state.updated_at or state.registered_at or "") < cutoff


def _is_open(state: MessageState | None) -> int:
    return int(state is not None and state.tracked and not state.final)
