"""A message state packed into one bytes object, the way the mirror (bus.index) holds it.

A mirror holds every open message of a replica's providers, up to millions, so a state there is
not an object with a dozen attributes and strings but one `bytes`: a fixed header the pollers
read without unpacking (revision, tracked and final, the times a schedule needs), the fact ids
as 8 bytes each, and the few remaining fields as compact JSON. Unpacking gives back exactly the
state that was packed (the bucket's copy is written from it with compare-and-set), so a
timestamp that milliseconds do not give back exactly is kept as its text as well.

A registered message with phone and client_ref packs into about 90 bytes; as a MessageState
with its strings it took about 450.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from bus.events import rfc3339
from bus.messages import MessageState

HEAD = struct.Struct("<QBBqqq")  # revision, flags, fact count, registered, sent, updated (ms)
NONE = -(2**63)  # no such time
TRACKED, FINAL = 1, 2
FACT_BYTES = 8  # a fact id (bus.messages.FACT_CHARS hex digits) as bytes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The rest, by short names: (field, name in the packed JSON).
_REST = (
    ("phone", "p"),
    ("client_ref", "c"),
    ("status", "s"),
    ("provider_status", "ps"),
    ("numbers", "n"),
    ("traceparent", "t"),
)


def pack(state: MessageState, revision: int) -> bytes:
    rest: dict[str, Any] = {}
    registered = _millis(state.registered_at, "ra", rest)
    sent = _millis(state.sent_at, "sa", rest)
    updated = _millis(state.updated_at, "ua", rest)
    facts = _fact_bytes(state.facts)
    if facts is None:  # not the usual hex prefixes: keep the text
        facts, rest["f"] = b"", list(state.facts)
    for field, name in _REST:
        value = getattr(state, field)
        if value is not None:
            rest[name] = value
    flags = TRACKED * state.tracked | FINAL * state.final
    head = HEAD.pack(revision, flags, len(facts) // FACT_BYTES, registered, sent, updated)
    return head + facts + (orjson.dumps(rest) if rest else b"")


def unpack(blob: bytes, provider: str, message_id: str) -> tuple[MessageState, int]:
    """The state packed in `blob`, and its revision."""
    revision, flags, count, registered, sent, updated = HEAD.unpack_from(blob)
    end = HEAD.size + FACT_BYTES * count
    rest = orjson.loads(blob[end:]) if len(blob) > end else {}
    if count:
        facts = tuple(blob[at : at + FACT_BYTES].hex() for at in range(HEAD.size, end, FACT_BYTES))
    else:
        facts = tuple(rest.get("f", ()))
    state = MessageState(
        provider,
        message_id,
        tracked=bool(flags & TRACKED),
        registered_at=rest["ra"] if "ra" in rest else _text(registered),
        phone=rest.get("p"),
        client_ref=rest.get("c"),
        sent_at=rest["sa"] if "sa" in rest else _text(sent),
        status=rest.get("s"),
        final=bool(flags & FINAL),
        provider_status=rest.get("ps"),
        updated_at=rest["ua"] if "ua" in rest else _text(updated),
        numbers=rest.get("n"),
        facts=facts,
        traceparent=rest.get("t"),
    )
    return state, revision


def revision_of(blob: bytes) -> int:
    revision: int = HEAD.unpack_from(blob)[0]
    return revision


def is_open(blob: bytes) -> bool:
    """Tracked and not final."""
    return blob[8] & (TRACKED | FINAL) == TRACKED


def reported(blob: bytes) -> tuple[bool, str | None]:
    """Final, and the provider's last status: what a poll compares a report with, read without
    building the whole state (a poll of an open message mostly hears what it heard before)."""
    end = HEAD.size + FACT_BYTES * blob[9]
    status = orjson.loads(blob[end:]).get("ps") if len(blob) > end else None
    return bool(blob[8] & FINAL), status


def times(blob: bytes) -> tuple[int, int, int]:
    """Registered, sent and updated, in milliseconds since the epoch (NONE when absent)."""
    _, _, _, registered, sent, updated = HEAD.unpack_from(blob)
    return registered, sent, updated


def _fact_bytes(facts: tuple[str, ...]) -> bytes | None:
    joined = "".join(facts)
    if len(joined) != 2 * FACT_BYTES * len(facts):
        return None
    try:
        packed = bytes.fromhex(joined)
    except ValueError:
        return None
    return packed if packed.hex() == joined else None


def _millis(value: str | None, name: str, rest: dict[str, Any]) -> int:
    """`value` as milliseconds; the text goes into `rest` too when they do not give it back."""
    if value is None:
        return NONE
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError("no time zone")
        ms = (moment - _EPOCH) // _MS
    except (ValueError, OverflowError):
        rest[name] = value
        return NONE
    if _text(ms) != value:
        rest[name] = value
    return ms


_SECONDS: dict[int, str] = {}  # a second's text: the states of a busy mirror share few seconds
_SECOND = timedelta(seconds=1)


def _text(ms: int) -> str | None:
    if ms == NONE:
        return None
    second, millis = divmod(ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        prefix = _SECONDS[second] = rfc3339(_EPOCH + second * _SECOND)[:-4]  # "...:SS."
    return f"{prefix}{millis:03d}Z"
