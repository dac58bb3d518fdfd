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
from collections.abc import Callable
from datetime import timedelta

import orjson
import structlog

from bus import packed, wire
from bus.events import utcnow
from bus.messages import MessageState, key_parts
from bus.statuses import PROVIDERS
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.index")

# Providers whose polls never repeat a report about a message that is final.
_NO_REPEATS = frozenset({"smspilot", "smstower", "epochta"})
RETAIN = timedelta(days=3)  # longer than SMSC's 2-day history look-back
PRUNE_EVERY = 600.0
RECENT = 4096  # states kept unpacked
WRITTEN = 65536  # own writes whose revision is not known yet, at most (bytes, state) each
_NO_BLOB = packed.HEAD.pack(0, 0, 0, 0, 0, 0)  # revision 0: older than anything held


class MessageIndex:
    """States by provider and message key, each packed (bus.packed) with its revision."""

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
        # Made here, before start-up's heap is frozen (smsbus.serve.settle_heap): a garbage
        # collection then never walks these, however many states they come to hold.
        self._by_provider: dict[str, dict[str, bytes]] = {p: {} for p in PROVIDERS}
        self._own: list[int] = []  # a heap: revisions this process wrote and `observe`d
        self._recent: dict[tuple[str, str], tuple[bytes, tuple[MessageState, int]]] = {}
        self._written: dict[str, tuple[bytes, MessageState]] = {}

    @property
    def held(self) -> int:
        """How many states the mirror holds."""
        return sum(len(states) for states in self._by_provider.values())

    def open_count(self, provider: str) -> int:
        """Tracked messages of `provider` with no final status yet."""
        return self._open[provider]

    def _blob(self, provider: str, message_key: str) -> bytes | None:
        states = self._by_provider.get(provider)
        return None if states is None else states.get(message_key)

    def entry(self, key: str) -> tuple[MessageState | None, int]:
        """A bucket key's state and revision as last seen (None, 0 when not held)."""
        provider, message_id = key_parts(key)
        blob = self._blob(provider, message_id)
        if blob is None:
            return None, 0
        return self._unpack(provider, message_id, blob)

    def get(self, provider: str, message_id: str) -> MessageState | None:
        blob = self._blob(provider, message_id)
        return None if blob is None else self._unpack(provider, message_id, blob)[0]

    def _unpack(self, provider: str, message_id: str, blob: bytes) -> tuple[MessageState, int]:
        """A held state, unpacked; the last few are kept, since a poll or a callback reads a
        state and then writes it (states are values, never modified, so sharing one is safe)."""
        recent = self._recent.get((provider, message_id))
        if recent is not None and recent[0] is blob:
            return recent[1]
        unpacked = packed.unpack(blob, provider, message_id)
        if len(self._recent) >= RECENT:
            self._recent.clear()
        self._recent[(provider, message_id)] = (blob, unpacked)
        return unpacked

    def is_open(self, provider: str, message_id: str) -> bool:
        """Held, tracked and not final."""
        blob = self._blob(provider, message_id)
        return blob is not None and packed.is_open(blob)

    def reported(self, provider: str, message_key: str) -> tuple[bool, str | None] | None:
        """A held state's final flag and last provider status (bus.packed.reported); None when
        not held."""
        blob = self._blob(provider, message_key)
        return None if blob is None else packed.reported(blob)

    def held_keys(self, provider: str) -> list[str]:
        """The message keys of a provider's held states: a copy, made in one short step (a
        million in about 14 ms), to be walked a slice at a time."""
        return list(self._by_provider.get(provider, ()))

    def timing(self, provider: str, message_id: str) -> tuple[float | None, float | None] | None:
        """An open tracked message's registration and `sent_at`, in seconds since the epoch
        (None when unknown); None when the message is not open or not held."""
        blob = self._blob(provider, message_id)
        if blob is None or not packed.is_open(blob):
            return None
        registered, sent, _ = packed.times(blob)
        return _seconds(registered), _seconds(sent)

    def apply(self, subject: bytes, data: bytes, headers: bytes, revision: int) -> None:
        """One message of the bucket's stream at `revision`, as the follower delivers it (in
        order), read raw (bus.wire): its subject, payload and headers."""
        own = self._own
        while own and own[0] < revision:  # superseded before the watch got to them
            heapq.heappop(own)
        if own and own[0] == revision:
            heapq.heappop(own)
            return  # our own write: applied when it was acknowledged
        key = subject[len(self._prefix) :].decode(errors="replace")
        written = self._written.pop(key, None)
        if written is not None and written[0] == data:
            self._hold(written[1], revision)  # the bytes this process wrote: nothing to decode
            return
        if not data or wire.raw_removes_key(headers):
            self._forget(*key_parts(key))
            return
        try:
            state = orjson.loads(data)
            provider = state["provider"]
            if state.get("final") and provider in _NO_REPEATS:  # most of what a watch brings
                message_id = state["message_id"]
                if revision >= packed.revision_of(self._blob(provider, message_id) or _NO_BLOB):
                    self._forget(provider, message_id)
                return
            held = MessageState.from_dict(state)
        except (ValueError, TypeError, KeyError):
            log.warning("unreadable state in the bucket", key=key)
            return
        self._hold(held, revision)

    def expect(self, key: str, value: bytes, state: MessageState) -> None:
        """This process is writing `value`, the JSON of `state`, under `key`, at a revision it
        will not learn (a fast batch): when the watch brings exactly these bytes, `state` is
        held without decoding them. A write that is not stored leaves its entry until the key's
        next write or delivery replaces it; their number is bounded."""
        if len(self._written) >= WRITTEN:
            self._written.clear()
        self._written[key] = (value, state)

    def observe(self, key: str, state: MessageState, revision: int) -> None:
        """This process wrote `state` at `revision`: hold it now rather than when the watch
        delivers it. A revision the follower has already passed is old news."""
        if revision <= self._floor() or revision <= self._revision(state):
            return
        heapq.heappush(self._own, revision)
        self._hold(state, revision)

    def clear(self) -> dict[str, dict[str, bytes]]:
        """Forget everything (the bucket's stream was recreated); what was held, by provider and
        message key, packed (bus.packed)."""
        # New maps: holding only strings and bytes, they are not tracked by the collector either.
        held, self._by_provider = self._by_provider, {p: {} for p in self._by_provider}
        for provider in held:
            if self._open[provider]:
                self._open[provider] = 0
                self._on_open(provider, 0)
        self._own.clear()
        self._written.clear()
        self._recent.clear()
        return held

    def _revision(self, state: MessageState) -> int:
        blob = self._blob(state.provider, state.message_id)
        return 0 if blob is None else packed.revision_of(blob)

    def _hold(self, state: MessageState, revision: int) -> None:
        if revision < self._revision(state):
            return
        if state.final and state.provider in _NO_REPEATS:
            self._forget(state.provider, state.message_id)
            return
        self._put(state.provider, state.message_id, packed.pack(state, revision))
        for listener in self.listeners:
            listener(state)

    def prune(self, retain: timedelta = RETAIN) -> int:
        """Let go of every state that is not open and has not changed for `retain`."""
        cutoff = (utcnow() - retain).timestamp() * 1000
        old = [
            (provider, message_id)
            for provider, states in self._by_provider.items()
            for message_id, blob in states.items()
            if not packed.is_open(blob) and _older(blob, cutoff)
        ]
        for provider, message_id in old:
            self._forget(provider, message_id)
        return len(old)

    async def prune_every(self, beat: Beat) -> None:
        while True:
            beat()
            await asyncio.sleep(PRUNE_EVERY)
            if pruned := self.prune():
                log.info("message states let go", count=pruned, held=self.held)

    def _forget(self, provider: str, message_id: str) -> None:
        self._put(provider, message_id, None)

    def _put(self, provider: str, message_id: str, blob: bytes | None) -> None:
        states = self._by_provider.setdefault(provider, {})
        old = states.get(message_id)
        if blob is not None:
            states[message_id] = blob
        elif old is not None:
            del states[message_id]
        change = _is_open(blob) - _is_open(old)
        if change:
            self._open[provider] += change
            self._on_open(provider, self._open[provider])


def _older(blob: bytes, cutoff: float) -> bool:
    """Last changed (else registered) before `cutoff` (ms), or never."""
    registered, _, updated = packed.times(blob)
    when = updated if updated != packed.NONE else registered
    return when == packed.NONE or when < cutoff


def _is_open(blob: bytes | None) -> int:
    return int(blob is not None and packed.is_open(blob))


def _seconds(ms: int) -> float | None:
    return None if ms == packed.NONE else ms / 1000
