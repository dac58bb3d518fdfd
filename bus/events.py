"""CloudEvents 1.0 in structured mode (CONTRACT.md section 5) and the subjects they go to.

An event is built once, as the exact bytes that are published and, if NATS does not ack in time,
spooled. Its id is a digest of the fact, so the same fact reported twice (a repeated callback, or a
callback and a poll) is one stored message: JetStream drops the second by its `Nats-Msg-Id`.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from bus.statuses import UNKNOWN, Normalised, normalise, normalise_error_code

CONTENT_TYPE = "application/cloudevents+json"
TYPES = ("status", "inbound", "balance", "deadletter")

# Dead-letter bodies are cut here (CONTRACT.md section 5).
DEADLETTER_BODY_LIMIT = 16 * 1024


@dataclass(slots=True)
class Event:
    """One event ready to publish: `payload` is the CloudEvent JSON. A value, never modified
    (not frozen: a frozen dataclass costs four times as much to build, on the callback's path)."""

    id: str
    subject: str
    type: str
    provider: str
    payload: bytes
    status: str | None = None  # the normalised status of a status event, for logs
    traceparent: str | None = None  # W3C Trace Context, also in the payload (CloudEvents)
    # A status event's `data` as built, so that writing its state need not decode the payload
    # (bus.projection); None for an event read back from the spool.
    data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        content_type = "application/json" if self.type == "track" else CONTENT_TYPE
        if self.traceparent is None:
            return {"Nats-Msg-Id": self.id, "Content-Type": content_type}
        return {
            "Nats-Msg-Id": self.id,
            "Content-Type": content_type,
            "traceparent": self.traceparent,
        }


_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))
_SECONDS: dict[tuple[int, ...], str] = {}  # recent seconds formatted
_KEEP = 64


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, with a Z. On the hot paths the same few seconds are formatted
    again and again (a callback's arrival, a poll answer's report times beside its arrival), so
    their text is kept (a fifth of formatting it)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    m = moment
    key = (m.second, m.minute, m.hour, m.day, m.month, m.year)
    text = _SECONDS.get(key)
    if text is None:  # each step is one dict operation: safe from any thread
        if len(_SECONDS) >= _KEEP:
            _SECONDS.clear()
        text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
        _SECONDS[key] = text
    return text + _MILLIS[m.microsecond // 1000]


def utcnow() -> datetime:
    return datetime.now(UTC)


def fact_id(*parts: str) -> str:
    """A deterministic hex digest of a fact's parts."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# Providers whose message id can name a send to several numbers: an SMS-Pager mailing's smsid,
# an SMSC id (its history has a row per phone). There a status belongs to the id and the phone.
PER_PHONE = frozenset({"smspager", "smsc"})


def message_key(provider: str, message_id: str, phone: str | None) -> str:
    """The key of a status fact: the message id; for SMS-Pager and SMSC, the id and the phone
    (CONTRACT.md section 5)."""
    return f"{message_id}/{phone}" if provider in PER_PHONE and phone else message_id


def subject(prefix: str, kind: str, provider: str, status: str | None = None) -> str:
    tail = f".{status}" if status else ""
    return f"{prefix}.{kind}.{provider}{tail}"


def _encode(
    event_id: str,
    provider: str,
    kind: str,
    key: str | None,
    time: str,
    data: Any,
    traceparent: str | None = None,
) -> bytes:
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"/smsbus/{provider}",
        "type": f"sms.{kind}",
    }
    if key is not None:
        envelope["subject"] = key
    envelope.update(time=time, datacontenttype="application/json")
    if traceparent is not None:  # the CloudEvents distributed-tracing extension
        envelope["traceparent"] = traceparent
    envelope["data"] = data
    return orjson.dumps(envelope)


def traceparent_of(payload: bytes) -> str | None:
    """The `traceparent` attribute of an encoded event (a spooled one has no headers kept)."""
    if b'"traceparent":' not in payload:
        return None
    value = orjson.loads(payload).get("traceparent")
    return value if isinstance(value, str) else None


def status_event(
    prefix: str,
    provider: str,
    message_id: str,
    raw_status: str,
    *,
    via: str,
    received_at: datetime,
    occurred_at: datetime | None = None,
    error_code: str | None = None,
    error: str | None = None,
    phone: str | None = None,
    client_ref: str | None = None,
    callback_params: Mapping[str, str] | None = None,
    traceparent: str | None = None,
) -> Event:
    """A delivery-status event. For SMS-Pager, pass the phone: it is part of the message key.
    `traceparent` is the registration's, so the sending app's trace leads to the report."""
    error_code = normalise_error_code(error_code)
    if via == "expiry":  # nothing final was heard within SMSBUS_TRACK_TTL
        raw_status = ""
        normalised = Normalised(UNKNOWN, final=True)
    else:
        normalised = normalise(provider, raw_status, error_code)
    key = message_key(provider, message_id, phone)
    event_id = fact_id(provider, "status", key, raw_status, error_code or "")
    received = rfc3339(received_at)
    occurred = rfc3339(occurred_at) if occurred_at else received
    data: dict[str, Any] = {
        "provider": provider,
        "message_id": message_id,
        "phone": phone,
        "client_ref": client_ref,
        "status": normalised.status,
        "final": normalised.final,
        "provider_status": raw_status,
        "error_code": error_code,
        "error": error,
        "occurred_at": occurred,
        "received_at": received,
        "via": via,
    }
    if via == "callback":
        data["callback_params"] = dict(callback_params or {})
    return Event(
        id=event_id,
        subject=subject(prefix, "status", provider, normalised.status),
        type="status",
        provider=provider,
        payload=_encode(event_id, provider, "status", message_id, occurred, data, traceparent),
        status=normalised.status,
        traceparent=traceparent,
        data=data,
    )


def untracked_message(event: Event) -> str | None:
    """The message id of a status event that has none of its message's tracking data (`phone`,
    `client_ref`, `traceparent`): built while the state could not be read, or for a message
    never registered; else None. Only for providers whose message key is the id alone (for the
    others the phone is part of the fact, and a poll always knows it)."""
    if event.type != "status" or event.provider in PER_PHONE:
        return None
    try:
        envelope = orjson.loads(event.payload)
        data = envelope["data"]
        message_id = data["message_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if data.get("phone") is None and data.get("client_ref") is None:
        if envelope.get("traceparent") is None and isinstance(message_id, str):
            return message_id
    return None


def with_tracking(
    event: Event, phone: str | None, client_ref: str | None, traceparent: str | None
) -> Event:
    """The same status event (same id, same fact) carrying its message's tracking data."""
    envelope = orjson.loads(event.payload)
    data = envelope["data"]
    data["phone"], data["client_ref"] = phone, client_ref
    payload = _encode(
        event.id, event.provider, "status", envelope.get("subject"), envelope["time"], data,
        traceparent,
    )  # fmt: skip
    return Event(
        id=event.id,
        subject=event.subject,
        type=event.type,
        provider=event.provider,
        payload=payload,
        status=event.status,
        traceparent=traceparent,
        data=data,
    )


def inbound_event(
    prefix: str,
    provider: str,
    message_id: str,
    *,
    sender: str,
    recipient: str,
    text: str,
    sent_at: datetime | None,
    received_at: datetime,
) -> Event:
    """An inbound SMS; its id is the provider's message id, so it is stored once."""
    event_id = fact_id(provider, "inbound", message_id)
    received = rfc3339(received_at)
    sent = rfc3339(sent_at) if sent_at else None
    data = {
        "provider": provider,
        "message_id": message_id,
        "from": sender,
        "to": recipient,
        "text": text,
        "sent_at": sent,
        "received_at": received,
    }
    return Event(
        id=event_id,
        subject=subject(prefix, "inbound", provider),
        type="inbound",
        provider=provider,
        payload=_encode(event_id, provider, "inbound", message_id, sent or received, data),
    )


def balance_event(
    prefix: str, provider: str, balance: Decimal, unit: str, checked_at: datetime
) -> Event:
    checked = rfc3339(checked_at)
    event_id = fact_id(provider, "balance", checked)
    data = {"provider": provider, "balance": str(balance), "unit": unit, "checked_at": checked}
    return Event(
        id=event_id,
        subject=subject(prefix, "balance", provider),
        type="balance",
        provider=provider,
        payload=_encode(event_id, provider, "balance", None, checked, data),
    )


def _utf8_head(head: bytes, cut: bool) -> str:
    """The text of a body's first bytes; a character split by the cut is left out."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if cut and exc.reason == "unexpected end of data":
            return head[: exc.start].decode("utf-8")
        raise


def deadletter_cut(event: Event, size: int) -> Event:
    """A dead letter cut to about `size` bytes, for a NATS server that takes less than it is
    (its max_payload): its raw body cut to a third of that (escaping can triple text) and each
    query value to 64 characters, `truncated` set; its reason and the rest kept, its id too."""
    envelope = orjson.loads(event.payload)
    raw = envelope["data"]["raw"]
    body = raw.get("body") or ""
    if raw.get("body_encoding") == "base64":
        head = base64.b64decode(body)[: size // 4]
        raw["body"] = base64.b64encode(head).decode("ascii")
    else:
        raw["body"] = body.encode("utf-8", errors="surrogatepass")[: size // 3].decode(
            "utf-8", errors="ignore"
        )
    raw["query"] = {
        name: [v[:64] for v in value] if isinstance(value, list) else value[:64]
        for name, value in raw.get("query", {}).items()
    }
    raw["truncated"] = True
    return Event(
        id=event.id,
        subject=event.subject,
        type=event.type,
        provider=event.provider,
        payload=orjson.dumps(envelope),
    )


def deadletter_event(
    prefix: str,
    provider: str,
    reason: str,
    *,
    received_at: datetime,
    method: str | None,
    path: str,
    query: Mapping[str, str | list[str]],
    body: bytes | str,
    peer: str | None,
    content_type: str | None = None,
) -> Event:
    """Input that could not be understood, kept whole enough to replay (`smsbus replay`) or debug.

    The body is kept as it came: its text when it is UTF-8, else base64 with `body_encoding`
    saying so (a windows-1251 form must replay byte for byte); `truncated` marks a body cut at
    DEADLETTER_BODY_LIMIT. Every dead letter is its own fact (two identical junk requests are two
    receptions), so its id is random rather than a digest.
    """
    raw: dict[str, Any] = {"method": method, "path": path, "query": dict(query)}
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    head = body[:DEADLETTER_BODY_LIMIT]
    try:
        raw["body"] = _utf8_head(head, cut=len(body) > len(head))
    except UnicodeDecodeError:
        raw["body"] = base64.b64encode(head).decode("ascii")
        raw["body_encoding"] = "base64"
    if len(body) > len(head):
        raw["truncated"] = True
    if content_type is not None:
        raw["content_type"] = content_type[:200]
    raw["peer"] = peer
    event_id = uuid.uuid4().hex
    time = rfc3339(received_at)
    data = {"provider": provider, "reason": reason, "raw": raw, "received_at": time}
    return Event(
        id=event_id,
        subject=subject(prefix, "deadletter", provider),
        type="deadletter",
        provider=provider,
        payload=_encode(event_id, provider, "deadletter", None, time, data),
    )
