"""The `smsbus` command (CONTRACT.md section 6).

`serve` runs the service (smsbus.serve wires the receiver, the pollers and the bus); the other
commands are small clients of NATS and the providers. Errors a user can fix end the process with
one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from datetime import datetime
from typing import Any
from urllib.parse import quote

import nats.errors
import nats.js.errors
import structlog
import uvloop
from nats.js.api import ConsumerConfig, DeliverPolicy

from bus.config import Settings, load_settings, redact_url
from bus.connection import Connection, describe, unreachable
from bus.errors import ConfigError, PayloadError, StartupError
from bus.events import PER_PHONE, message_key
from bus.logs import configure_logging
from bus.messages import TrackItem, parse_track_item
from bus.scan import first_since
from bus.shapes import digits
from bus.statuses import PROVIDERS
from bus.stream import stream_exists

log = structlog.get_logger("smsbus")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smsbus", description="SMS delivery reports as CloudEvents on NATS JetStream."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cmd = commands.add_parser(
        "serve", help="receive callbacks, poll providers, publish events (runs until stopped)"
    )
    split = serve_cmd.add_mutually_exclusive_group()
    split.add_argument("--no-pollers", action="store_true", help="receive only; poll nothing")
    split.add_argument(
        "--pollers-only", action="store_true", help="poll only; serve just the health routes"
    )
    tail_cmd = commands.add_parser("tail", help="print events as they are published, one per line")
    tail_cmd.add_argument("subject", nargs="?", help="subject to follow (default: PREFIX.>)")
    tail_cmd.add_argument(
        "--since", help="first the events stored since then: RFC 3339, or an age: 90s, 30m, 12h"
    )
    track_cmd = commands.add_parser("track", help="register a sent message for tracking")
    track_cmd.add_argument("provider", choices=PROVIDERS)
    track_cmd.add_argument("message_id")
    track_cmd.add_argument("--phone")
    track_cmd.add_argument("--client-ref")
    track_cmd.add_argument("--sent-at", help="RFC 3339, e.g. 2026-11-22T10:00:00Z")
    commands.add_parser(
        "check",
        help="validate the settings, reach NATS and each enabled provider; exit 1 on failure",
    )
    status_cmd = commands.add_parser("status", help="print a message's current state as JSON")
    status_cmd.add_argument("provider", choices=PROVIDERS)
    status_cmd.add_argument("message_id")
    status_cmd.add_argument(
        "--phone", help="one number of an SMS-Pager or SMSC send (without it: the whole send)"
    )
    for name, what in (
        ("deadletters", "list dead letters, one JSON line each with its stream sequence"),
        ("replay", "feed dead letters through today's parsers; exit 1 if any still fails"),
    ):
        cmd = commands.add_parser(name, help=what)
        if name == "replay":
            cmd.add_argument("seq", nargs="*", type=int, help="stream sequences (else: filters)")
            cmd.add_argument("--keep", action="store_true", help="keep replayed dead letters")
        cmd.add_argument("--provider", choices=PROVIDERS)
        cmd.add_argument("--since", help="RFC 3339 time, or an age: 90s, 30m, 12h, 7d")
        cmd.add_argument("--reason", help="only those whose reason contains this text")
    args = parser.parse_args(argv)
    if args.command == "status" and args.phone is not None:
        if args.provider not in PER_PHONE or not digits(args.phone):
            status_cmd.error("--phone is for a number of an SMS-Pager or SMSC send")

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"smsbus: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        configure_logging(settings.log_format)
    else:  # a command's stderr is for its one line and for warnings, not for its progress
        configure_logging(settings.log_format, sys.stderr, logging.WARNING)
    try:
        if args.command == "serve":
            from smsbus.serve import serve

            return _run(serve(settings, receive=not args.pollers_only, poll=not args.no_pollers))
        if args.command == "track":
            raw = {
                "provider": args.provider,
                "message_id": args.message_id,
                "phone": args.phone,
                "client_ref": args.client_ref,
                "sent_at": args.sent_at,
            }
            item = parse_track_item({k: v for k, v in raw.items() if v is not None})
            return _run(track(settings, item))
        if args.command == "status":
            phone = digits(args.phone) if args.phone is not None else None
            key = message_key(args.provider, args.message_id, phone)
            return _run(status(settings, args.provider, key))
        if args.command == "check":
            return _run(check(settings))
        if args.command in ("deadletters", "replay"):
            return _run(deadletters(settings, args))
        return _run(tail(settings, args.subject, _since(args.since)))
    except PayloadError as exc:
        print(f"smsbus: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"smsbus: {exc}", file=sys.stderr)
        return 1


def _run(coro: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _since(text: str | None) -> datetime | None:
    """A command's --since (RFC 3339 or an age), parsed before anything is reached."""
    if not text:
        return None
    from smsbus.deadletters import parse_since

    return parse_since(text)


async def tail(settings: Settings, subject: str | None, since: datetime | None = None) -> int:
    """Print each event the stream stores from now on (or `since` then), its JSON on one line;
    `PREFIX.track.*` inputs only when asked for. Reading the stream (an ordered consumer), not
    the raw subjects, shows what subscribers get: a repeated fact that JetStream dropped is not
    printed."""
    conn = await _connect(settings, reads_stream=True)
    nc = conn.nc
    track_prefix = f"{settings.subject_prefix}.track."
    skip_track = subject is None
    subject = subject or f"{settings.subject_prefix}.>"
    done = asyncio.Event()

    async def on_message(msg: Any) -> None:
        if skip_track and msg.subject.startswith(track_prefix):
            return
        try:
            line = json.dumps(json.loads(msg.data), ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            raw = msg.data.decode("utf-8", errors="replace")
            line = json.dumps({"subject": msg.subject, "raw": raw}, ensure_ascii=False)
        try:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `smsbus tail | head`
            done.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    js = nc.jetstream()
    try:
        start = None
        if since is not None:
            first = await first_since(js, settings.stream, subject, since)
            start = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                   opt_start_seq=first)  # fmt: skip
        await js.subscribe(
            subject,
            stream=settings.stream,
            cb=on_message,
            config=start,
            ordered_consumer=True,
            deliver_policy=None if start else DeliverPolicy.NEW,
            # nats-py makes the consumer again after two heartbeats missed (a NATS restart): in
            # 2 s, not nats-py's 10 s
            idle_heartbeat=TAIL_HEARTBEAT,
        )
    except (TimeoutError, nats.errors.Error) as exc:
        await conn.close()
        raise StartupError(f"cannot follow {subject}: {describe(exc)}") from None
    await done.wait()
    await conn.close()
    return 0


CLI_CONNECT = 5.0  # seconds a command tries to reach NATS
TAIL_HEARTBEAT = 1.0  # seconds between the tail's consumer's heartbeats


async def _connect(settings: Settings, reads_stream: bool = False) -> Connection:
    """A command's NATS connection; closed with `close()`, which does not log the disconnect
    it makes as one it suffered. A command that `reads_stream` says so, in one line, when there
    is none to read (a NATS that `smsbus serve` never ran against, another SMSBUS_STREAM)."""
    hint = "" if settings.nats_urls else " (is `smsbus serve` running?)"
    if not settings.nats_urls:
        await _embedded_listening(settings, hint)
    conn = Connection(settings)
    try:
        await conn.open(time.monotonic() + CLI_CONNECT)
    except StartupError as exc:
        raise StartupError(f"{exc}{hint}") from None
    if reads_stream:
        try:
            there = await stream_exists(conn.nc.jetstream(), settings.stream)
        except (TimeoutError, nats.errors.Error) as exc:
            await conn.close()
            raise StartupError(f"cannot read stream {settings.stream}: {describe(exc)}") from None
        if not there:
            await conn.close()
            raise StartupError(
                f"SMSBUS_STREAM: there is no stream {settings.stream} on this NATS; "
                "has `smsbus serve` run against it?"
            )
    return conn


async def _embedded_listening(settings: Settings, hint: str) -> None:
    """The embedded nats-server runs only while `smsbus serve` does, on this machine: a port
    that refuses the connection is an answer at once, not after CLI_CONNECT of retries."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", settings.embedded_nats_port), CLI_CONNECT
        )
    except ConnectionRefusedError as exc:
        raise StartupError(f"{unreachable(settings, str(exc))}{hint}") from None
    except (OSError, TimeoutError):
        return  # the connection's own attempts say what is wrong
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _api(settings: Settings) -> str:
    """The private API's address as a local client reaches it."""
    host = settings.api_host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.api_port}"


async def _call_api(settings: Settings, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    base = _api(settings)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise StartupError(
            f"SMSBUS_API_PORT: cannot reach the smsbus API at {base} ({type(exc).__name__}; "
            "is `smsbus serve` running?)"
        ) from None


async def track(settings: Settings, item: TrackItem) -> int:
    """Register one message through the private API (POST /v1/messages); print the accepted
    count. Once it is printed, the message's callbacks and polls carry its tracking data."""
    answer = await _call_api(
        settings, "POST", "/v1/messages", content=item.to_json(),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    if answer.status_code != 202:
        body = (
            answer.json()
            if answer.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        reason = (
            body.get("error")
            or "; ".join(e["error"] for e in body.get("errors", []))
            or answer.text
        )
        raise StartupError(f"the registration was not stored: {answer.status_code} {reason}")
    print(answer.json()["accepted"])
    return 0


async def status(settings: Settings, provider: str, message_id: str) -> int:
    """Print GET /v1/messages/<provider>/<message_id> from the private API; exit 1 when the
    message is unknown."""
    answer = await _call_api(
        settings, "GET", f"/v1/messages/{provider}/{quote(message_id, safe='/')}"
    )
    if answer.status_code == 404:
        print(json.dumps({"error": "unknown message"}))
        return 1
    if answer.status_code != 200:
        raise StartupError(f"cannot read the message state: {answer.status_code} {answer.text}")
    print(json.dumps(answer.json(), ensure_ascii=False))
    return 0


async def deadletters(settings: Settings, args: argparse.Namespace) -> int:
    """`smsbus deadletters` and `smsbus replay` (smsbus.deadletters)."""
    from smsbus.deadletters import Filters, list_letters, replay

    filters = Filters(provider=args.provider, since=_since(args.since), reason=args.reason)
    conn = await _connect(settings, reads_stream=True)
    nc = conn.nc
    try:
        if args.command == "deadletters":
            return await list_letters(nc, settings, filters)
        if args.seq and (args.provider or args.since or args.reason):
            raise PayloadError("give sequences or filters, not both")
        return await replay(nc, settings, args.seq, filters, args.keep)
    except (TimeoutError, nats.errors.Error) as exc:
        raise StartupError(f"cannot read the dead letters: {describe(exc)}") from None
    finally:
        await conn.close()


async def check(settings: Settings) -> int:
    """One line per part: the settings, NATS, and each provider (off, ok, or FAILED)."""
    import httpx

    from bus.errors import ProviderError
    from pollers.runner import REGISTRY

    print("config: ok")
    failed = False
    try:
        conn = await _connect(settings)
        try:
            await conn.nc.jetstream().account_info()
            print(f"nats: ok ({', '.join(redact_url(u) for u in settings.effective_nats_urls)})")
        except (TimeoutError, nats.errors.Error) as exc:
            print(f"nats: FAILED: JetStream is not available: {describe(exc)}")
            failed = True
        finally:
            await conn.close()
    except StartupError as exc:
        print(f"nats: FAILED: {exc}")
        failed = True
    async with httpx.AsyncClient(headers={"user-agent": "smsbus"}) as http:
        for name, provider in settings.providers.items():
            if not provider.enabled:
                print(f"{name}: off (no credentials)")
                continue
            try:
                result = await REGISTRY[name](provider, http).check()
            except ProviderError as exc:
                print(f"{name}: FAILED: {exc}")
                failed = True
            else:
                print(f"{name}: ok ({result})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
