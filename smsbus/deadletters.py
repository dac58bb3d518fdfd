"""`smsbus deadletters` and `smsbus replay` (CONTRACT.md section 6): dead letters listed, and fed
again through today's parsers.

A dead-lettered SMSPilot callback is parsed as the receiver parses one (its query, then its form
or multipart body) and becomes the status event the receiver would have published at the time it
was received: the same deterministic id, so replaying twice stores it once, and the phone and
`client_ref` of its registration. A dead-lettered `sms.track.<provider>` body is published again,
item by item, as registrations with their own deterministic ids. What still does not parse stays
where it is; what was published is removed from the dead letters once NATS has acknowledged it
(unless `--keep`). Provider answers are not replayed: the poller asks the provider again anyway.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
import orjson

from bus.config import Settings
from bus.errors import PayloadError, StartupError
from bus.events import Event, status_event
from bus.messages import kv_key, parse_track_batch
from bus.projection import write_with
from bus.scan import held
from bus.state import read_state
from bus.statuses import PROVIDERS, SMSPILOT_ERRORS
from bus.stream import bucket_names
from receiver.smspilot import PATH, PROVIDER, form_pairs, parse_callback, query_pairs

ACK_TIMEOUT = 5.0


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    subject: str
    data: dict[str, Any]

    @property
    def provider(self) -> str:
        return str(self.data.get("provider", ""))

    @property
    def reason(self) -> str:
        return str(self.data.get("reason", ""))

    @property
    def raw(self) -> dict[str, Any]:
        raw = self.data.get("raw")
        return raw if isinstance(raw, dict) else {}

    def line(self) -> str:
        return json.dumps(
            {"seq": self.seq, "subject": self.subject, **self.data},
            ensure_ascii=False, separators=(",", ":"),
        )  # fmt: skip


def dead_letter(seq: int, subject: str, payload: bytes) -> DeadLetter:
    try:
        event = orjson.loads(payload)
        data = event["data"] if isinstance(event, dict) and isinstance(event["data"], dict) else {}
    except (orjson.JSONDecodeError, KeyError):
        data = {}
    if not data:
        body = payload.decode(errors="replace")
        data = {"reason": "not a dead-letter event", "raw": {"body": body}}
    return DeadLetter(seq, subject, data)


def parse_since(text: str) -> datetime:
    """--since: RFC 3339 (`2026-12-01T10:00:00Z`), or an age (`90s`, `30m`, `12h`, `7d`)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.fromtimestamp(
            datetime.now(UTC).timestamp() - int(text[:-1]) * units[text[-1]], UTC
        )
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError(
            f"--since {text!r}: give RFC 3339 or an age such as 30m, 12h, 7d"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Filters:
    provider: str | None = None
    since: datetime | None = None
    reason: str | None = None

    def subject(self, prefix: str) -> str:
        return f"{prefix}.deadletter.{self.provider or '*'}"

    def match(self, letter: DeadLetter) -> bool:
        return self.reason is None or self.reason.lower() in letter.reason.lower()


async def scan(js: Any, settings: Settings, filters: Filters) -> AsyncIterator[DeadLetter]:
    """Every dead letter the stream holds now that the filters select, oldest first."""
    messages = held(js, settings.stream, filters.subject(settings.subject_prefix), filters.since)
    async with contextlib.aclosing(messages):
        try:
            async for msg in messages:
                letter = dead_letter(msg.metadata.sequence.stream, msg.subject, msg.data)
                if filters.match(letter):
                    yield letter
        except TimeoutError:  # nats-py raises its own and asyncio's; both are TimeoutErrors
            return  # purged or removed meanwhile: what is there has been read


async def by_sequence(js: Any, settings: Settings, seqs: list[int]) -> AsyncIterator[DeadLetter]:
    """The dead letters at these stream sequences; a sequence that holds none is an error."""
    dead = f"{settings.subject_prefix}.deadletter."
    for seq in seqs:
        try:
            msg = await js.get_msg(settings.stream, seq)
        except nats.js.errors.NotFoundError:
            raise StartupError(f"sequence {seq}: no such message in {settings.stream}") from None
        if not msg.subject or not msg.subject.startswith(dead):
            raise StartupError(f"sequence {seq}: {msg.subject} is not a dead letter")
        yield dead_letter(seq, msg.subject, msg.data or b"")


class Unreplayable(Exception):
    """This dead letter is not input smsbus can take again (a provider's answer)."""


def raw_body(raw: dict[str, Any]) -> bytes:
    body = raw.get("body") or ""
    if not isinstance(body, str):
        raise PayloadError("the kept body is not text")
    if raw.get("body_encoding") == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except binascii.Error:
            raise PayloadError("the kept body is not valid base64") from None
    return body.encode("utf-8")


def _received_at(letter: DeadLetter) -> datetime:
    try:
        return datetime.fromisoformat(str(letter.data["received_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return datetime.now(UTC)


async def events_of(letter: DeadLetter, kv: Any, prefix: str) -> list[Event]:
    """What today's parsers make of a dead letter; PayloadError when it still does not parse."""
    raw = letter.raw
    path = str(raw.get("path") or "")
    if raw.get("truncated"):
        raise PayloadError("its body was cut when it was kept; it cannot be read again whole")
    if raw.get("method") is None:
        kind, _, provider = path.removeprefix(f"{prefix}.").partition(".")
        if kind != "track" or provider not in PROVIDERS:
            raise Unreplayable(f"not input smsbus receives ({path or 'no path'})")
        return [item.event(prefix) for item in parse_track_batch(raw_body(raw), provider)]
    if letter.provider != PROVIDER or not path.startswith(PATH):
        raise Unreplayable(f"not an SMSPilot callback ({path or 'no path'})")
    query = raw.get("query") or {}
    if not isinstance(query, dict):
        raise PayloadError("the kept query is not an object")
    pairs = query_pairs(query)
    body = raw_body(raw)
    if body:
        scope = {"type": "http", "method": "POST", "path": PATH, "headers": []}
        pairs += await form_pairs(scope, raw.get("content_type") or _sniff(body), body)
    params = parse_callback(pairs)
    tracked, _ = await read_state(kv, kv_key(PROVIDER, params.server_id))
    event = status_event(
        prefix,
        PROVIDER,
        params.server_id,
        params.status,
        via="callback",
        received_at=_received_at(letter),
        error_code=params.error,
        error=SMSPILOT_ERRORS.get(params.error or ""),
        phone=tracked.phone if tracked else None,
        client_ref=tracked.client_ref if tracked else None,
        callback_params=params.extra,
        traceparent=tracked.traceparent if tracked else None,
    )
    if tracked is not None and tracked.records(event.id):
        return []  # stored before: nothing to publish
    return [event]


def _sniff(body: bytes) -> str | None:
    """A dead letter kept before `content_type` was recorded: a multipart body opens with its
    boundary line; anything else is read as a form."""
    if body.startswith(b"--"):
        boundary = body[2 : body.find(b"\r\n")].decode("latin-1")
        if boundary and " " not in boundary:
            return f"multipart/form-data; boundary={boundary}"
    return None


async def publish(js: Any, kv: Any, event: Event) -> bool:
    """Publish and wait for the ack, then write the state of a status event (as `smsbus serve`
    does for what it publishes); False when JetStream already held this id."""
    ack = await js.publish(event.subject, event.payload, headers=event.headers, timeout=ACK_TIMEOUT)
    await write_with(kv, event)
    return not ack.duplicate


@dataclass
class Tally:
    replayed: int = 0
    already: int = 0
    failed: int = 0
    skipped: int = 0


async def replay(nc: Any, settings: Settings, seqs: list[int], filters: Filters, keep: bool) -> int:
    js = nc.jetstream()
    kv = await js.key_value(bucket_names(settings.stream)[0])
    letters = by_sequence(js, settings, seqs) if seqs else scan(js, settings, filters)
    tally = Tally()
    async for letter in letters:
        outcome: dict[str, Any] = {"seq": letter.seq, "provider": letter.provider}
        try:
            events = await events_of(letter, kv, settings.subject_prefix)
        except Unreplayable as exc:
            tally.skipped += 1
            _print({**outcome, "outcome": "skipped", "reason": str(exc)})
            continue
        except PayloadError as exc:
            tally.failed += 1
            _print({**outcome, "outcome": "failed", "reason": str(exc), "was": letter.reason})
            continue
        try:
            stored = [await publish(js, kv, event) for event in events]
        except (TimeoutError, nats.errors.Error) as exc:
            tally.failed += 1
            _print({**outcome, "outcome": "failed", "reason": f"not stored: {exc!r}"})
            continue
        if any(stored):
            tally.replayed += 1
            result = "replayed"
        else:
            tally.already += 1
            result = "already stored"
        _print({**outcome, "outcome": result, "events": [e.id for e in events]})
        if not keep:
            try:
                await js.delete_msg(settings.stream, letter.seq)
            except nats.js.errors.NotFoundError:
                pass  # another replay removed it first
    _print({"summary": True, **tally.__dict__})
    return 1 if tally.failed else 0


async def list_letters(nc: Any, settings: Settings, filters: Filters) -> int:
    count = 0
    async for letter in scan(nc.jetstream(), settings, filters):
        sys.stdout.write(letter.line() + "\n")
        count += 1
    sys.stdout.flush()
    print(f"{count} dead letter{'' if count == 1 else 's'}", file=sys.stderr)
    return 0


def _print(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()
