"""Tracked messages: what a sending app registers, and each message's current state.

A registration (`POST /v1/messages`, `smsbus track`, or a message on `sms.track.<provider>`) is one
object `{provider, message_id, phone?, client_ref?, sent_at?}`. The current state of a message lives
in a key-value bucket, written with compare-and-set by the projector (bus.projector) from the
stream, and by `POST /v1/messages` itself, so a registration is visible before its `202`.

A state also records the ids of the facts applied to it (a short prefix of each event id), so a
fact repeated after the stream's duplicate window is recognised and not stored again.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson
from pydantic import ValidationError

from bus.errors import PayloadError
from bus.events import Event, fact_id, message_key, subject
from bus.shapes import MAX_ITEMS, REGISTRATION, digits, reason, valid_traceparent

__all__ = ["MAX_ITEMS", "digits"]  # bus.shapes defines them; callers have always found them here

FACT_CHARS = 16  # of an event id's 64 hex digits: 64 bits, ample within one message's facts
MAX_FACTS = 32  # a message has a handful of facts; bound what junk statuses can add
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_=-]+$")


def fact_of(event_id: str) -> str:
    """How a state records an event id."""
    return event_id[:FACT_CHARS]


@dataclass(frozen=True, slots=True)
class TrackItem:
    provider: str
    message_id: str
    phone: str | None = None
    client_ref: str | None = None
    sent_at: str | None = None  # RFC 3339, UTC
    traceparent: str | None = None  # W3C Trace Context of the send; not part of the fact

    def to_json(self) -> bytes:
        fields = {k: getattr(self, k) for k in self.__slots__}
        return orjson.dumps({k: v for k, v in fields.items() if v is not None})

    def event(self, prefix: str) -> Event:
        """This registration as published on `<prefix>.track.<provider>`."""
        return Event(
            id=self.fact,
            subject=subject(prefix, "track", self.provider),
            type="track",
            provider=self.provider,
            payload=self.to_json(),
        )

    @property
    def fact(self) -> str:
        """Nats-Msg-Id of this registration: the same registration twice is stored once."""
        return fact_id(
            self.provider, "track", self.message_id, self.phone or "", self.client_ref or "",
            self.sent_at or "",
        )  # fmt: skip


class TrackErrors(PayloadError):
    """Every reason a registration batch was refused, by item index."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{e['index']}: {e['error']}" for e in errors))
        self.errors = errors


def parse_track_item(raw: Any, provider_hint: str | None = None) -> TrackItem:
    """One registration (bus.shapes.Registration), validated; PayloadError with the first
    reason otherwise. On `sms.track.<provider>` the provider may be left out."""
    if provider_hint is not None and isinstance(raw, dict):
        provider = raw.setdefault("provider", provider_hint)
        if provider != provider_hint:
            raise PayloadError(
                f"provider {provider!r} does not match the subject's {provider_hint!r}"
            )
    try:
        item = REGISTRATION.validate_python(raw)
    except ValidationError as exc:
        raise PayloadError(reason(exc)) from None
    return TrackItem(
        item.provider, item.message_id, item.phone, item.client_ref, item.sent_at,
        item.traceparent,
    )  # fmt: skip


def parse_track_batch(body: bytes, provider_hint: str | None = None) -> list[TrackItem]:
    """A registration body (POST /v1/messages, or a message on `sms.track.<provider>` with that
    provider as the hint): one object or a list of at most MAX_ITEMS, all valid, or TrackErrors
    naming each bad item by its index."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TrackErrors([{"index": None, "error": "body is not JSON"}]) from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise TrackErrors([{"index": None, "error": "no messages given"}])
    if len(items) > MAX_ITEMS:
        raise TrackErrors([{"index": None, "error": f"more than {MAX_ITEMS} messages"}])
    parsed, errors = [], []
    for index, raw in enumerate(items):
        try:
            parsed.append(parse_track_item(raw, provider_hint))
        except PayloadError as exc:
            errors.append({"index": index, "error": str(exc)})
    if errors:
        raise TrackErrors(errors)
    return parsed


def with_trace(items: list[TrackItem], traceparent: str | None) -> list[TrackItem]:
    """The `traceparent` of the request or NATS message that carried registrations, given to
    each item that has none of its own. One that is not valid W3C Trace Context is ignored, as
    the standard asks of a receiver: a trace is never a reason to refuse a registration."""
    if traceparent is None or not valid_traceparent(traceparent.strip()):
        return items
    trace = traceparent.strip()
    return [item if item.traceparent else replace(item, traceparent=trace) for item in items]


def kv_key(provider: str, message_id: str) -> str:
    """A bucket key for a message: ids outside the key alphabet are base64url-encoded."""
    if message_id.isascii() and message_id.isalnum():  # the usual id, without a regex
        return f"{provider}.{message_id}"
    if _SAFE_KEY.match(message_id) and not message_id.startswith("b64_"):
        return f"{provider}.{message_id}"
    encoded = base64.urlsafe_b64encode(message_id.encode()).decode().rstrip("=")
    return f"{provider}.b64_{encoded}"


def key_parts(key: str) -> tuple[str, str]:
    """The provider and message key a bucket key was made from (kv_key undone)."""
    provider, _, message_id = key.partition(".")
    if message_id.startswith("b64_"):
        encoded = message_id[4:]
        try:
            message_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except ValueError:
            pass  # not one of ours: keep it as it is
    return provider, message_id


_DEFAULTS = (None, False, ())  # compared with `in`: equality, so also 0 and 0.0 (never a field)


@dataclass(slots=True)
class MessageState:
    """The current state of one message (the value under its key). A value: a change builds a
    new one, none is ever modified (not frozen only because a frozen dataclass costs four times
    as much to build, and states are built on the callback's path)."""

    provider: str
    message_id: str
    tracked: bool = False
    registered_at: str | None = None
    phone: str | None = None
    client_ref: str | None = None
    sent_at: str | None = None
    status: str | None = None
    final: bool = False
    provider_status: str | None = None
    updated_at: str | None = None
    # SMS-Pager mailings: each number's {"status", "final"}; the mailing is final when all are.
    numbers: dict[str, dict[str, Any]] | None = None
    facts: tuple[str, ...] = ()  # fact_of(event id) of every status applied, oldest first
    traceparent: str | None = None  # of the registration: sent on the message's status events

    def to_json(self) -> bytes:
        """The bucket's value: the fields that differ from their defaults (from_json fills in
        the rest), a third less to store and to replicate than every field."""
        return orjson.dumps(
            {k: v for k in self.__slots__ if (v := getattr(self, k)) not in _DEFAULTS}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> MessageState:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MessageState:
        """A state from its decoded JSON (`to_json`)."""
        fields = {k: data[k] for k in cls.__slots__ if k in data}
        fields["facts"] = tuple(fields.get("facts") or ())
        return cls(**fields)

    def records(self, event_id: str) -> bool:
        """True when this fact has been applied to the state already."""
        return fact_of(event_id) in self.facts

    def public(self) -> dict[str, Any]:
        """The body of GET /v1/messages/<provider>/<message_id>."""
        return {
            "provider": self.provider,
            "message_id": self.message_id,
            "status": self.status,
            "final": self.final,
            "provider_status": self.provider_status,
            "phone": self.phone,
            "client_ref": self.client_ref,
            "updated_at": self.updated_at,
            "traceparent": self.traceparent,
        }


def register(state: MessageState | None, item: TrackItem, at: str) -> MessageState:
    """Apply a registration; the status already known is kept."""
    if state is None:  # the usual case, built at once (`replace` costs as much again)
        return MessageState(
            item.provider,
            item.message_id,
            tracked=True,
            registered_at=at,
            phone=item.phone or None,
            client_ref=item.client_ref or None,
            sent_at=item.sent_at or None,
            traceparent=item.traceparent or None,
            updated_at=at,
        )
    return replace(
        state,
        tracked=True,
        registered_at=state.registered_at or at,
        phone=item.phone or state.phone,
        client_ref=item.client_ref or state.client_ref,
        sent_at=item.sent_at or state.sent_at,
        traceparent=item.traceparent or state.traceparent,
        updated_at=state.updated_at or at,
    )


def apply_to_mailing(state: MessageState | None, data: Mapping[str, Any]) -> MessageState:
    """Apply one number's SMS-Pager status to its mailing: the number's entry in `numbers`, and
    the mailing is final once every number it has is final."""
    if state is None:
        state = MessageState(data["provider"], data["message_id"])
    numbers = dict(state.numbers or {})
    held = numbers.get(data["phone"])
    if held is None or not held["final"] or data["final"]:
        numbers[data["phone"]] = {"status": data["status"], "final": bool(data["final"])}
    return replace(
        state,
        numbers=numbers,
        status=data["status"],
        provider_status=data["provider_status"],
        final=all(n["final"] for n in numbers.values()),
        updated_at=data["occurred_at"],
    )


def apply_status(
    state: MessageState | None, data: Mapping[str, Any], event_id: str
) -> MessageState:
    """Apply a status event's data, recording its fact. A final status never gives way to a
    non-final one; between two final reports the later one wins: the one that happened later, or
    on a tie the one applied later (so a report redelivered out of order cannot undo a newer one).
    A fact already recorded changes nothing."""
    fact = fact_of(event_id)
    if state is None:  # the usual case for a message never tracked, built at once
        key = message_key(data["provider"], data["message_id"], data.get("phone"))
        return MessageState(
            data["provider"],
            key,
            phone=data.get("phone"),
            status=data["status"],
            final=bool(data["final"]),
            provider_status=data["provider_status"],
            updated_at=data["occurred_at"],
            facts=(fact,),
        )
    if fact in state.facts:
        return state
    phone = state.phone or data.get("phone")
    facts = (*state.facts, fact)[-MAX_FACTS:]
    if state.final and not data["final"]:
        return _evolve(state, phone=phone, facts=facts)
    if state.final and (data["occurred_at"] or "") < (state.updated_at or ""):
        return _evolve(state, phone=phone, facts=facts)
    return _evolve(
        state,
        phone=phone,
        status=data["status"],
        final=bool(data["final"]),
        provider_status=data["provider_status"],
        updated_at=data["occurred_at"],
        facts=facts,
    )


def restore(state: MessageState | None, held: MessageState) -> MessageState:
    """`held`, a message's state as a replica held it when the bucket lost it (a NATS server
    back on an empty store), put back into what the bucket has by then (None: nothing; else
    another replica's copy, or a report since): the registration's fields from either, the
    facts of both, and the status as `apply_status` would leave it between the two (final over
    not final; else the later, the bucket's on a tie). Putting back what is there changes
    nothing."""
    if state is None or state == held:
        return held if state is None else state
    later = (held.updated_at or "") > (state.updated_at or "")
    winner = held if (held.final, later) > (state.final, False) else state
    numbers = _numbers(state.numbers, held.numbers)
    return _evolve(
        winner,
        tracked=state.tracked or held.tracked,
        registered_at=held.registered_at or state.registered_at,
        phone=state.phone or held.phone,
        client_ref=state.client_ref or held.client_ref,
        sent_at=state.sent_at or held.sent_at,
        traceparent=state.traceparent or held.traceparent,
        numbers=numbers,
        final=winner.final or bool(numbers and all(n["final"] for n in numbers.values())),
        facts=(*held.facts, *(f for f in state.facts if f not in held.facts))[-MAX_FACTS:],
    )


def _numbers(
    state: dict[str, dict[str, Any]] | None, held: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]] | None:
    """A mailing's numbers from two copies: each number's final status over one that is not."""
    if not held:
        return state
    merged = dict(held)
    for phone, number in (state or {}).items():
        if number["final"] or not merged.get(phone, number)["final"]:
            merged[phone] = number
    return merged


_FIELDS = MessageState.__slots__


def _evolve(state: MessageState, **changes: Any) -> MessageState:
    """`dataclasses.replace` without its per-call introspection (a third of its cost)."""
    return MessageState(*[changes[f] if f in changes else getattr(state, f) for f in _FIELDS])
