"""SMSPilot's delivery-status callback (smspilot.txt, send parameter 6 `callback`).

SMSPilot calls our URL with `server_id`, `status` and `error` (GET query, or POST form with
`callback_method=post`) and wants the text `OK` within 10 seconds; anything else makes it try
again. So `OK` is sent only once the event is durable, a retry-worthy failure is a 503, and input
we will never accept is a 400 with its raw form kept on the dead-letter subject.

This is the hot path, so it is a plain ASGI callable served ahead of Starlette's middleware stack.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import structlog
from starlette.requests import Request

from bus.config import callback_tokens_from
from bus.core import Bus
from bus.errors import ConfigError, EventTooLarge, PayloadError, PublishError
from bus.events import deadletter_event, rfc3339, status_event, utcnow
from bus.logs import info_line
from bus.statuses import SMSPILOT_ERRORS
from receiver.http import (
    BodyTooLarge,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_text,
)
from receiver.limits import PerPeerRate
from receiver.peers import allowed, client_address

log = structlog.get_logger("smsbus.callback")

PROVIDER = "smspilot"
PATH = "/callbacks/smspilot"
FIELDS = ("server_id", "status", "error")
MAX_FIELDS = 100
TOKENS_READ_EVERY = 5.0  # s: SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE read again at most this often

# Around a field SMSPilot's numbers may carry ASCII white space, and only that (the description
# says so in its patterns); str.strip() alone would also take \x1c-\x1f, \x85 and other Unicode.
BLANK = " \t\n\v\f\r"
_SERVER_ID = re.compile(r"^[0-9]{1,20}$")
_STATUS = re.compile(r"^-?[0-9]{1,4}$")
_ERROR = re.compile(r"^[0-9]{1,6}$")
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"

_OK_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")],
}
_OK_BODY: Message = {"type": "http.response.body", "body": b"OK"}


@dataclass(frozen=True)
class CallbackParams:
    server_id: str
    status: str
    error: str | None
    extra: dict[str, str]


def _text(raw: bytes) -> str:
    """A decoded query value: its UTF-8 text, or, when it is not valid UTF-8 (a windows-1251
    `?ref=%C7%E0%EA%E0%E7` from an older system), its bytes kept as `%XX` escapes (CONTRACT.md
    section 5) so that nothing the sender put in its URL is lost."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 and b != 0x25 else f"%{b:02X}" for b in raw)


def parse_pairs(raw: bytes, what: str) -> list[tuple[str, str]]:
    """Decode a URL-encoded query or form body, pair by pair; PayloadError when it has more
    than MAX_FIELDS fields. Values that are not UTF-8 are kept escaped (`_text`); whether
    SMSPilot's own three fields are acceptable is parse_callback's question."""
    parts = [part for part in raw.split(b"&") if part]
    if len(parts) > MAX_FIELDS:
        raise PayloadError(f"{what} has more than {MAX_FIELDS} fields")
    if b"%" not in raw and b"+" not in raw and raw.isascii():  # SMSPilot's usual query
        return [_split(part.decode("ascii")) for part in parts]
    return _decode(parts)


def _split(pair: str) -> tuple[str, str]:
    key, _, value = pair.partition("=")
    return key, value


def _decode(parts: list[bytes]) -> list[tuple[str, str]]:
    pairs = []
    for part in parts:
        key, _, value = part.partition(b"=")
        pairs.append(
            (_text(unquote_to_bytes(key.replace(b"+", b" "))),
             _text(unquote_to_bytes(value.replace(b"+", b" "))))
        )  # fmt: skip
    return pairs


def query_object(raw: bytes) -> dict[str, str | list[str]]:
    """A query string as a dead letter keeps it (`raw.query`): decoded as parse_pairs decodes
    it, so that a replay reads the same values, with no limit on the number of fields (a query
    refused for having too many is kept whole too); a repeated key holds a list."""
    query: dict[str, str | list[str]] = {}
    for key, value in _decode([part for part in raw.split(b"&") if part]):
        held = query.get(key)
        if held is None:
            query[key] = value
        else:
            query[key] = [*held, value] if isinstance(held, list) else [held, value]
    return query


def query_pairs(query: dict[str, Any]) -> list[tuple[str, str]]:
    """The pairs of a dead letter's `raw.query` (query_object's inverse), in order."""
    pairs = []
    for key, value in query.items():
        for one in value if isinstance(value, list) else [value]:
            pairs.append((str(key), str(one)))
    return pairs


async def form_pairs(scope: Scope, content_type: str | None, body: bytes) -> list[tuple[str, str]]:
    """The fields of a POST body: URL-encoded (the default) or multipart/form-data."""
    kind = (content_type or _FORM).split(";")[0].strip().lower()
    if kind == _FORM:
        return parse_pairs(body, "form body")
    if kind != _MULTIPART:
        raise PayloadError(f"unsupported Content-Type {kind[:60]!r}")

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", (content_type or "").encode("latin-1", errors="replace"))]
    try:
        request = Request({**scope, "headers": headers}, replay)
        form = await request.form(max_files=0, max_fields=MAX_FIELDS)
    except Exception as exc:  # python-multipart's errors have no common base
        raise PayloadError(f"multipart body rejected: {str(exc)[:120]}") from None
    return [(key, value) for key, value in form.multi_items() if isinstance(value, str)]


def parse_callback(pairs: list[tuple[str, str]]) -> CallbackParams:
    """Validate SMSPilot's three fields; every other parameter is kept as a string."""
    values: dict[str, str] = {}
    extra: dict[str, str] = {}
    for key, value in pairs:
        if key not in FIELDS:
            extra[key] = value
        elif values.setdefault(key, value) != value:
            raise PayloadError(f"{key} is given twice with different values")
    server_id = values.get("server_id", "").strip(BLANK)
    status = values.get("status", "").strip(BLANK)
    error = values.get("error", "").strip(BLANK)
    if not server_id:
        raise PayloadError("server_id is missing")
    if not _SERVER_ID.match(server_id):
        raise PayloadError("server_id must be a whole number of at most 20 digits")
    if not status:
        raise PayloadError("status is missing")
    if not _STATUS.match(status):
        raise PayloadError("status must be a whole number")
    if error and not _ERROR.match(error):
        raise PayloadError("error must be a whole number")
    return CallbackParams(
        server_id=str(int(server_id)),
        status=str(int(status)),
        error=str(int(error)) if error else None,
        extra=extra,
    )


class SMSPilotCallbacks:
    """The ASGI app behind GET/POST /callbacks/smspilot[/<token>]."""

    METHODS = ("GET", "POST")

    def __init__(self, bus: Bus, deadletters_a_minute: int) -> None:
        settings = bus.settings
        self._deadletters = PerPeerRate(deadletters_a_minute)
        self._publisher = bus.publisher
        self._metrics = bus.metrics
        self._states = bus.states
        self._state = bus.providers[PROVIDER]
        self._prefix = settings.subject_prefix
        self._tokens = [t.reveal().encode() for t in settings.smspilot_callback_tokens]
        self._token_file = settings.smspilot_callback_token_file
        self._tokens_read_at = time.monotonic()
        self._token_error: str | None = None  # why the file was last not taken, told once
        self._allowlist = settings.smspilot_allowed_ips
        self._trusted = settings.trusted_proxies
        self._answered: list[dict[str, object]] = []  # answered, not yet counted and logged
        self._in_flight = 0  # read when /metrics is rendered, not counted under a lock
        bus.metrics.callbacks_in_flight.set_function(lambda: self._in_flight)

    @staticmethod
    def matches(path: str) -> bool:
        return path == PATH or path.startswith(PATH + "/")

    def _token_accepted(self, path: str) -> bool:
        if self._token_file is not None:
            now = time.monotonic()
            if now - self._tokens_read_at >= TOKENS_READ_EVERY:
                self._read_tokens(self._token_file, now)
        token = path[len(PATH) + 1 :] if path != PATH else None
        if not self._tokens:
            return token is None
        if token is None:
            return False
        presented = token.encode()
        accepted = False
        for expected in self._tokens:  # every token compared, in constant time each
            accepted |= hmac.compare_digest(presented, expected)
        return accepted

    def _read_tokens(self, path: Path, now: float) -> None:
        """SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE read again, so that a rotated Kubernetes Secret
        (a new token beside the old, then the old one gone) is taken without a restart, as the
        providers' credentials are. A file that cannot be read, is empty or holds a token that
        would be refused at start leaves the tokens in use, with a warning (once per reason)."""
        self._tokens_read_at = now
        try:
            tokens = [t.reveal().encode() for t in callback_tokens_from(path)]
        except ConfigError as exc:
            tokens, reason = [], str(exc)
        else:
            reason = "" if tokens else f"{path} holds no token"
        if reason:
            if reason != self._token_error:
                log.warning("callback tokens not read again; those in use stay", error=reason)
            self._token_error = reason
            return
        self._token_error = None
        if tokens != self._tokens:
            self._tokens = tokens
            log.info("callback tokens read again from their file", tokens=len(tokens))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        path = scope["path"]
        shown_path = PATH if path == PATH else f"{PATH}/***"
        summary: dict[str, object] = {"provider": PROVIDER, "method": scope["method"]}
        self._in_flight += 1
        try:
            status, text, outcome = await self._handle(scope, receive, shown_path, summary)
        except ClientGone:
            return
        except Exception:
            log.exception("callback failed", **summary)
            status, text, outcome = 500, "Internal Server Error", "failed"
        finally:
            self._in_flight -= 1
        if status == 200:
            await send(_OK_START)
            await send(_OK_BODY)
        else:
            allow = ((b"allow", b"GET, POST"),) if status == 405 else ()
            await send_text(send, status, text, allow)
        summary.update(
            outcome=outcome,
            http_status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        # Counted and logged in the next turn of the event loop, together with the other
        # callbacks answered in this one: under load a batch's acknowledgement wakes dozens of
        # callbacks at once, and each answer then goes out without waiting for the lines and
        # counts of those before it (bench/HISTORY.md, "Answers first"; README "Benchmarks").
        self._answered.append(summary)
        if len(self._answered) == 1:
            asyncio.get_running_loop().call_soon(self._summarise)

    def _summarise(self) -> None:
        """The outcome counts and summary lines of the callbacks answered in the last turn."""
        answered, self._answered = self._answered, []
        counts = self._metrics.callback_outcome
        for summary in answered:
            try:
                counts[str(summary["outcome"])].inc()
                info_line(log, "callback", summary)
            except Exception:  # a fault of ours: the other callbacks' lines are still written
                log.exception("callback summary not written")

    async def _handle(
        self, scope: Scope, receive: Receive, shown_path: str, summary: dict[str, object]
    ) -> tuple[int, str, str]:
        if not self._token_accepted(scope["path"]):
            return 404, "Not Found", "not_found"
        client = scope.get("client")
        peer = client[0] if client else None
        if self._trusted:
            peer = client_address(peer, header(scope, b"x-forwarded-for"), self._trusted)
        if not allowed(peer, self._allowlist):
            summary["peer"] = peer
            return 403, "Forbidden: peer not in SMSBUS_SMSPILOT_ALLOWED_IPS", "forbidden"
        method = scope["method"]
        if method not in self.METHODS:
            return 405, "Method Not Allowed", "bad_method"

        received_at = utcnow()
        body = b""
        try:
            if method == "POST":
                body = await read_body(scope, receive)
            pairs = parse_pairs(scope["query_string"], "query string")
            if body:
                pairs += await form_pairs(scope, header(scope, b"content-type"), body)
            params = parse_callback(pairs)
        except BodyTooLarge as exc:
            await self._dead_letter(scope, shown_path, exc.head, peer, str(exc), received_at)
            return 413, str(exc), "too_large"
        except PayloadError as exc:
            summary["reason"] = str(exc)
            await self._dead_letter(scope, shown_path, body, peer, str(exc), received_at)
            return 400, str(exc), "malformed"

        # The mirror, else the bucket: a registration a moment ago on any replica is seen.
        readable, tracked = await self._states.find(PROVIDER, params.server_id)
        event = status_event(
            self._prefix,
            PROVIDER,
            params.server_id,
            params.status,
            via="callback",
            received_at=received_at,
            error_code=params.error,
            error=SMSPILOT_ERRORS.get(params.error or ""),
            phone=tracked.phone if tracked else None,
            client_ref=tracked.client_ref if tracked else None,
            callback_params=params.extra,
            traceparent=tracked.traceparent if tracked else None,
        )
        summary.update(server_id=params.server_id, status=event.status, raw=params.status)
        if tracked is not None and tracked.records(event.id):
            return 200, "OK", "duplicate"  # stored before, however long ago
        try:
            if readable:
                outcome = await self._publisher.publish(event)
            else:  # published by the spool's drainer once the state can be read (or in 30 s)
                outcome = await self._publisher.spool(event)
        except EventTooLarge as exc:  # never storable here: refused, and kept as a dead letter
            summary["reason"] = str(exc)
            await self._dead_letter(scope, shown_path, body, peer, str(exc), received_at)
            return 413, str(exc), "too_large"
        except PublishError as exc:
            self._state.last_error = str(exc)
            return 503, "event could not be stored; try again", "failed"
        self._state.last_success = rfc3339(received_at)
        return 200, "OK", outcome

    async def _dead_letter(
        self,
        scope: Scope,
        shown_path: str,
        body: bytes,
        peer: str | None,
        reason: str,
        received_at: datetime,
    ) -> None:
        self._state.last_error = reason
        if not self._deadletters.allow(peer):  # SMSBUS_DEADLETTER_RATE: still a 4xx, not kept
            self._metrics.deadletters_dropped.labels(PROVIDER).inc()
            return
        query = query_object(scope["query_string"])
        event = deadletter_event(
            self._prefix,
            PROVIDER,
            reason,
            received_at=received_at,
            method=scope["method"],
            path=shown_path,
            query=query,
            body=body,
            peer=peer,
            content_type=header(scope, b"content-type") if scope["method"] == "POST" else None,
        )
        try:
            await self._publisher.publish(event)  # cut to fit where NATS takes less
        except PublishError as exc:
            log.error("dead letter lost", reason=reason, error=str(exc))
