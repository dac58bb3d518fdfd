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
from datetime import datetime
from typing import Any

import orjson

from bus.errors import PayloadError
from bus.events import Event, fact_id, message_key, rfc3339, subject
from bus.statuses import PROVIDERS

MAX_ITEMS = 1000
FIELDS = frozenset({"provider", "message_id", "phone", "client_ref", "sent_at"})

# Ids the providers' documents call numbers: SMSPilot server_id, SMSTOWER idMessage, SMSC id.
_NUMERIC_IDS = frozenset({"smspilot", "smstower", "smsc"})
# smspager.txt: "Длина идентификатора не должна быть более 21 символа".
_MAX_ID = {"smspager": 21}
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_=-]+$")
_ASCII_DIGITS = re.compile(r"[0-9]+")
FACT_CHARS = 16  # of an event id's 64 hex digits: 64 bits, ample within one message's facts
MAX_FACTS = 32  # a message has a handful of facts; bound what junk statuses can add


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


def digits(text: str) -> str:
    """Only the digits of a phone number (or any text)."""
    return "".join(ch for ch in text if "0" <= ch <= "9")


def parse_track_item(raw: Any, provider_hint: str | None = None) -> TrackItem:
    """One registration, validated; PayloadError with the first reason otherwise."""
    if not isinstance(raw, dict):
        raise PayloadError("expected a JSON object")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise PayloadError(f"unknown field {unknown[0]!r}")
    provider = raw.get("provider", provider_hint)
    if provider not in PROVIDERS:
        raise PayloadError(f"provider must be one of {', '.join(PROVIDERS)}")
    if provider_hint is not None and provider != provider_hint:
        raise PayloadError(f"provider {provider!r} does not match the subject's {provider_hint!r}")
    message_id = raw.get("message_id")
    if isinstance(message_id, int) and not isinstance(message_id, bool):
        message_id = str(message_id)
    if not isinstance(message_id, str) or not message_id.strip():
        raise PayloadError("message_id is required (a string)")
    if message_id != message_id.strip():
        raise PayloadError("message_id has leading or trailing whitespace")
    if len(message_id) > _MAX_ID.get(provider, 64):
        raise PayloadError(f"message_id is longer than {_MAX_ID.get(provider, 64)} characters")
    if provider in _NUMERIC_IDS and not _ASCII_DIGITS.fullmatch(message_id):
        raise PayloadError(f"{provider} message ids are whole numbers")
    phone = raw.get("phone")
    if phone is not None:
        if isinstance(phone, int) and not isinstance(phone, bool):
            phone = str(phone)
        if not isinstance(phone, str) or not 5 <= len(digits(phone)) <= 20:
            raise PayloadError("phone must hold 5 to 20 digits")
        phone = digits(phone)
    client_ref = raw.get("client_ref")
    if client_ref is not None and (not isinstance(client_ref, str) or len(client_ref) > 256):
        raise PayloadError("client_ref must be a string of at most 256 characters")
    sent_at = raw.get("sent_at")
    if sent_at is not None:
        sent_at = rfc3339(parse_rfc3339(sent_at, "sent_at"))
    return TrackItem(provider, message_id, phone, client_ref, sent_at)


def parse_rfc3339(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise PayloadError(f"{name} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{name} is not RFC 3339 (e.g. 2026-11-22T10:00:00Z)") from None
    if moment.tzinfo is None:
        raise PayloadError(f"{name} needs a time zone (e.g. Z or +03:00)")
    return moment


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


def kv_key(provider: str, message_id: str) -> str:
    """A bucket key for a message: ids outside the key alphabet are base64url-encoded."""
    if _SAFE_KEY.match(message_id) and not message_id.startswith("b64_"):
        return f"{provider}.{message_id}"
    encoded = base64.urlsafe_b64encode(message_id.encode()).decode().rstrip("=")
    return f"{provider}.b64_{encoded}"


@dataclass(frozen=True, slots=True)
class MessageState:
    """The current state of one message (the value under its key)."""

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

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson writes a dataclass's fields itself, 20x asdict's speed

    @classmethod
    def from_json(cls, raw: bytes) -> MessageState:
        data = orjson.loads(raw)
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
        }


def register(state: MessageState | None, item: TrackItem, at: str) -> MessageState:
    """Apply a registration; the status already known is kept."""
    if state is None:
        state = MessageState(item.provider, item.message_id)
    return replace(
        state,
        tracked=True,
        registered_at=state.registered_at or at,
        phone=item.phone or state.phone,
        client_ref=item.client_ref or state.client_ref,
        sent_at=item.sent_at or state.sent_at,
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
    if state is None:
        key = message_key(data["provider"], data["message_id"], data.get("phone"))
        state = MessageState(data["provider"], key)
    if state.records(event_id):
        return state
    phone = state.phone or data.get("phone")
    facts = (*state.facts, fact_of(event_id))[-MAX_FACTS:]
    if state.final and not data["final"]:
        return replace(state, phone=phone, facts=facts)
    if state.final and (data["occurred_at"] or "") < (state.updated_at or ""):
        return replace(state, phone=phone, facts=facts)
    return replace(
        state,
        phone=phone,
        status=data["status"],
        final=bool(data["final"]),
        provider_status=data["provider_status"],
        updated_at=data["occurred_at"],
        facts=facts,
    )
