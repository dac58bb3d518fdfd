"""What smsbus keeps in JetStream, created or updated at start (never recreated, so nothing stored
is lost by a restart with new settings): the stream holding every subject under the prefix, and
the key-value buckets for message state, cursors and poller leases.

Start-up retries these calls with back-off until SMSBUS_STARTUP_TIMEOUT: a cluster that is still
electing leaders answers timeouts, "JetStream system temporarily unavailable" or "insufficient
resources" for a while, and replicas started together race to create the same stream. Only what
no retry can fix stops start-up at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, StreamInfo
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.backoff import Backoff
from bus.config import Settings
from bus.connection import describe
from bus.errors import StartupError

log = structlog.get_logger("smsbus.stream")

T = TypeVar("T")

REPLICAS_NOT_SUPPORTED = 10074  # JSStreamReplicasNotSupportedErr
INVALID_CONFIG = 10052  # JSStreamInvalidConfigF
LEASE_MAX_AGE = 1 / 2  # of SMSBUS_LEASE_TTL: the server drops a lease not renewed for this long
# Stream settings of later nats-server releases than some a user may run (allow_batched: 2.14,
# allow_atomic: 2.12). Releases before 2.12 ignore a setting they do not know; 2.12 and 2.13
# refuse the request ("invalid JSON: json: unknown field \"allow_batched\""), so it is asked
# again without that setting, and the stream does without what it gives.
LATER_SETTINGS = ("allow_batched", "allow_atomic")
_UNKNOWN_FIELD = re.compile(r'unknown field "(\w+)"')


def bucket_names(stream: str) -> tuple[str, str, str]:
    """The message-state, cursor and lease buckets that belong to a stream."""
    return f"{stream}_messages", f"{stream}_cursors", f"{stream}_leases"


def _seconds_or_none(value: float) -> float | None:
    return value if value > 0 else None


def commit_subject(stream: str) -> str:
    """Where fast batches are committed: a subject of the stream's own, outside the prefix, so
    that no subscriber of the event subjects sees the (never stored) commit message."""
    return f"_smsbus.{stream}.commit"


def stream_config(settings: Settings) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.subject_prefix}.>", commit_subject(settings.stream)],
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        duplicate_window=settings.duplicate_window,
        max_age=_seconds_or_none(settings.stream_max_age),
        allow_batched=True,  # fast batches (nats-server 2.14+): bus.group's group commit
    )


async def ensure_stream(js: JetStreamContext, settings: Settings) -> StreamConfig:
    """Create or update the stream; its configuration as the server has it (`allow_batched`
    set when it takes fast batches: an older nats-server ignores the setting)."""
    wanted = stream_config(settings)
    name = settings.stream
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return (await without_unknown_settings(js.add_stream, wanted)).config
    current = info.config
    if current.storage not in (None, StorageType.FILE):
        raise StartupError(
            f"SMSBUS_STREAM: stream {name} exists with {current.storage.value} storage; "
            "smsbus needs file storage (delete or rename that stream)"
        )
    updated = dataclasses.replace(
        current,
        subjects=sorted({*(current.subjects or []), *(wanted.subjects or [])}),
        num_replicas=wanted.num_replicas,
        duplicate_window=wanted.duplicate_window,
        max_age=wanted.max_age or 0.0,
        allow_batched=True,
    )
    if _differs(updated, current) or not current.allow_batched:
        current = (await without_unknown_settings(js.update_stream, updated)).config
    return current


async def without_unknown_settings(
    call: Callable[[StreamConfig], Awaitable[StreamInfo]], config: StreamConfig
) -> StreamInfo:
    """`call(config)` (a stream's creation or update), asked again without each of the
    LATER_SETTINGS the server refuses as a field it does not know."""
    while True:
        try:
            return await call(config)
        except nats.js.errors.APIError as exc:
            unknown = _UNKNOWN_FIELD.search(exc.description or "")
            field = unknown.group(1) if unknown else None
            if field not in LATER_SETTINGS or getattr(config, field) is None:
                raise
            config = dataclasses.replace(config)
            setattr(config, field, None)


def _differs(wanted: StreamConfig, current: StreamConfig) -> bool:
    """Compare what we set; the server reports unset durations as 0."""
    fields = ("subjects", "num_replicas", "duplicate_window", "max_age")
    return any((getattr(wanted, f) or 0) != (getattr(current, f) or 0) for f in fields)


async def ensure_bucket(
    js: JetStreamContext, name: str, replicas: int, max_age: float = 0.0
) -> KeyValue:
    """A key-value bucket holding one value per key, made or brought to these settings."""
    config = KeyValueConfig(
        bucket=name,
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
        ttl=_seconds_or_none(max_age),
        # Direct gets only with a single replica: on a replicated bucket any replica may answer
        # one, also one that is behind, and a state read must see every write acknowledged
        # before it (read your writes). bus.state reads the leader there.
        direct=replicas == 1,
    )
    try:
        bucket = await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(config)
    info = await js.stream_info(f"KV_{name}")
    current = info.config
    window = current.duplicate_window or 0.0
    updated = dataclasses.replace(
        current,
        num_replicas=replicas,
        max_age=max_age or 0.0,
        duplicate_window=min(window, max_age) if max_age else window,
        allow_direct=replicas == 1,
    )
    if _differs(updated, current) or bool(current.allow_direct) != (replicas == 1):
        await js.update_stream(updated)
        bucket = await js.key_value(name)  # bound again: it reads allow_direct
    return bucket


async def allow_batches(js: JetStreamContext, bucket: str) -> tuple[bool, bool]:
    """Let a bucket's stream take atomic batches (registrations, bus.state) and fast batches
    (status states written through, bus.projection); whether it takes each (an older
    nats-server ignores a setting it does not know)."""
    info = await js.stream_info(f"KV_{bucket}")
    if not (info.config.allow_atomic and info.config.allow_batched):
        wanted = dataclasses.replace(info.config, allow_atomic=True, allow_batched=True)
        info = await without_unknown_settings(js.update_stream, wanted)
    return bool(info.config.allow_atomic), bool(info.config.allow_batched)


def state_commit_subject(bucket: str) -> str:
    """Where a fast batch of state writes is committed: a key of the bucket no message has
    (every message key starts with its provider), never stored."""
    return f"$KV.{bucket}._smsbus_commit"


@dataclasses.dataclass(frozen=True)
class Buckets:
    batched: bool  # the stream takes fast batches
    max_msg_size: int  # the stream's limit on a message, headers included (an operator's); -1: none
    atomic: bool  # the message-state bucket takes atomic batches
    states_batched: bool  # ... and fast batches
    messages: KeyValue
    cursors: KeyValue


async def ensure_all(js: JetStreamContext, settings: Settings) -> Buckets:
    """The stream and the three buckets, made or brought to the settings; the handles of the
    state and cursor buckets (the lease bucket's is bound on another connection, bus.core)."""
    stream = await ensure_stream(js, settings)
    messages, cursors, leases = bucket_names(settings.stream)
    replicas = settings.stream_replicas
    states = await ensure_bucket(js, messages, replicas, settings.state_max_age)
    atomic, states_batched = await allow_batches(js, messages)
    await ensure_bucket(js, leases, replicas, settings.lease_ttl * LEASE_MAX_AGE)
    return Buckets(
        batched=bool(stream.allow_batched),
        max_msg_size=_limit(stream),
        atomic=atomic,
        states_batched=states_batched,
        messages=states,
        cursors=await ensure_bucket(js, cursors, replicas),
    )


async def retrying(deadline: float, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    """Run `attempt` until it succeeds or `deadline` (monotonic) passes; then one StartupError
    `what: <the last error>`. Errors no retry can fix are raised at once."""
    backoff = Backoff(0.2, 3.0)
    while True:
        try:
            return await attempt()
        except StartupError:
            raise
        except nats.js.errors.APIError as exc:
            if exc.err_code == REPLICAS_NOT_SUPPORTED:
                raise StartupError(
                    "SMSBUS_STREAM_REPLICAS: this NATS is not a cluster; use 1"
                ) from None
            if exc.err_code == INVALID_CONFIG:
                raise StartupError(f"{what}: {exc.description}") from None
            error: BaseException = exc
        except (TimeoutError, nats.errors.Error) as exc:
            error = exc
        reason = describe(error)
        wait = backoff.failed()
        if time.monotonic() + wait > deadline:
            raise StartupError(f"{what}: {reason}") from None
        log.info("not ready yet; retrying", step=what, error=reason, retry_in_s=round(wait, 2))
        await asyncio.sleep(wait)


async def stream_exists(js: JetStreamContext, name: str) -> bool:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return False
    return True


def _limit(config: StreamConfig) -> int:
    return config.max_msg_size if config.max_msg_size and config.max_msg_size > 0 else -1


async def look(js: JetStreamContext, settings: Settings) -> tuple[list[str], int]:
    """Which of the stream and its buckets' streams the server does not have (deleted under a
    running smsbus: `nats stream rm`, `nats kv del`; a server back on an empty store), and the
    stream's limit on a message as it is now (an operator's `nats stream edit`; -1: none)."""
    gone, limit = [], -1
    for name in [settings.stream, *(f"KV_{bucket}" for bucket in bucket_names(settings.stream))]:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            gone.append(name)
            continue
        if name == settings.stream:
            limit = _limit(info.config)
    return gone, limit
