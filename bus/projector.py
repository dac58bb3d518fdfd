"""The projector: a durable JetStream consumer that turns the stream into current state.

It reads `<prefix>.track.>` (registrations) and `<prefix>.status.>` (status events) in stream
order and writes each message's state into the `<STREAM>_messages` bucket, acknowledging a stream
message only after its state is stored. Writes are compare-and-set on the key's revision, so
several replicas sharing the durable consumer never overwrite each other. Junk on `track` goes to
the dead-letter subject and is acknowledged: it will never parse.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.errors import PayloadError, PublishError
from bus.events import deadletter_event, message_key, rfc3339, utcnow
from bus.index import MessageIndex
from bus.messages import (
    MessageState,
    apply_status,
    apply_to_mailing,
    kv_key,
    parse_track_item,
    register,
)
from bus.publisher import Publisher

log = structlog.get_logger("smsbus.projector")

DURABLE = "smsbus-projector"
BATCH = 256
CAS_ATTEMPTS = 50
RETRY_AFTER = 1.0  # seconds before a message whose write failed is delivered again
ACK_WAIT = 5.0
# Keys written at once. More makes bursts of ack handling that hold the event loop (and the
# callbacks waiting on it) for tens of milliseconds; 16 keeps each burst near a millisecond.
CONCURRENCY = 16


def bucket_names(stream: str) -> tuple[str, str]:
    """The message-state and cursor buckets that belong to a stream."""
    return f"{stream}_messages", f"{stream}_cursors"


async def ensure_bucket(js: JetStreamContext, name: str, replicas: int) -> KeyValue:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE, replicas=replicas)
        )


async def read_state(kv: KeyValue, key: str) -> tuple[MessageState | None, int]:
    """A key's state and revision; (None, 0) when there is none. NATS errors pass through."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    return (MessageState.from_json(entry.value) if entry.value else None), entry.revision


async def update_state(
    kv: KeyValue,
    key: str,
    change: Callable[[MessageState | None], MessageState],
    seen: tuple[MessageState | None, int] | None = None,
) -> MessageState:
    """Change and write one key with compare-and-set. The first try starts from `seen` (the local
    mirror's state and revision) when given, saving a read; a stale mirror only costs a retry."""
    for attempt in range(CAS_ATTEMPTS):
        if attempt == 0 and seen is not None:
            current, revision = seen
        else:
            current, revision = await read_state(kv, key)
        new = change(current)
        if new == current:
            return new
        try:
            if revision:
                await kv.update(key, new.to_json(), last=revision)
            else:
                await kv.create(key, new.to_json())
            return new
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # someone else wrote it; read again
    raise nats.errors.Error(f"{key}: still contended after {CAS_ATTEMPTS} attempts")


class Projector:
    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        publisher: Publisher,
        stream: str,
        prefix: str,
        index: MessageIndex | None = None,
    ) -> None:
        self._js = js
        self._kv = kv
        self._index = index
        self._publisher = publisher
        self._stream = stream
        self._prefix = prefix
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._gate = asyncio.Semaphore(CONCURRENCY)

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=DURABLE,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            # A replica that dies holding messages delays them by this much: a registration
            # must reach the pollers quickly. Applying a message takes milliseconds, and one
            # applied twice changes nothing.
            ack_wait=ACK_WAIT,
            max_ack_pending=4 * BATCH,
            filter_subjects=[f"{self._prefix}.track.>", f"{self._prefix}.status.>"],
        )
        await self._js.add_consumer(self._stream, config)
        sub = await self._js.pull_subscribe_bind(durable=DURABLE, stream=self._stream)
        self._task = asyncio.create_task(self._run(sub), name="smsbus-projector")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # nats-py's fetch turns a cancellation into TimeoutError; either means "stopped".
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await self._task

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            try:
                msgs = await sub.fetch(BATCH, timeout=1)
            except TimeoutError:  # nats.errors.TimeoutError is one too
                continue
            except nats.errors.Error as exc:
                log.warning("projector fetch failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(1)
                continue
            # Messages about one key are applied in stream order; different keys concurrently.
            groups: dict[str, list[Msg]] = {}
            for msg in msgs:
                groups.setdefault(self._key_of(msg), []).append(msg)
            try:
                await asyncio.gather(*(self._apply_in_order(group) for group in groups.values()))
            except Exception:  # a bug must not end projection; unacked messages come back
                log.exception("projector round failed")
                await asyncio.sleep(1)

    async def _apply_in_order(self, msgs: list[Msg]) -> None:
        async with self._gate:
            await self._apply_each(msgs)

    async def _apply_each(self, msgs: list[Msg]) -> None:
        for i, msg in enumerate(msgs):
            try:
                await self.apply(msg)
                await msg.ack()
            except (TimeoutError, nats.errors.Error, PublishError) as exc:
                # Neither this nor the rest of its key is applied: all come back after
                # RETRY_AFTER, in stream order (after ACK_WAIT if even the nak is lost).
                log.warning("projector write failed", error=str(exc) or type(exc).__name__)
                with contextlib.suppress(nats.errors.Error):
                    for rest in msgs[i:]:
                        await rest.nak(delay=RETRY_AFTER)
                return

    @staticmethod
    def _key_of(msg: Msg) -> str:
        """The state key a message will touch (a best guess for junk, which touches none)."""
        try:
            data = orjson.loads(msg.data)
            data = data.get("data", data)
            provider = data.get("provider") or msg.subject.split(".")[2]
            # A mailing's numbers all touch the mailing's entry: keep them in one group.
            return kv_key(str(provider), str(data["message_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return msg.subject

    async def apply(self, msg: Msg) -> None:
        kind, provider = msg.subject.split(".")[1:3]
        stored_at = rfc3339(msg.metadata.timestamp) if msg.metadata.timestamp else None
        if kind == "track":
            await self._track(msg, provider, stored_at or rfc3339(utcnow()))
        else:
            await self._status(msg)

    async def _track(self, msg: Msg, provider: str, at: str) -> None:
        try:
            try:
                raw = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                raise PayloadError("not JSON") from None
            item = parse_track_item(raw, provider_hint=provider)
        except PayloadError as exc:
            await self._dead_letter(msg, provider, str(exc))
            return
        key = kv_key(item.provider, item.message_id)
        await update_state(self._kv, key, lambda s: register(s, item, at), self._seen(key))

    async def _status(self, msg: Msg) -> None:
        try:
            data = orjson.loads(msg.data)["data"]
            provider, phone = data["provider"], data.get("phone")
            key = kv_key(provider, message_key(provider, data["message_id"], phone))
            complete = all(f in data for f in ("status", "final", "provider_status", "occurred_at"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            complete = False
        if not complete:
            await self._dead_letter(msg, msg.subject.split(".")[2], "not a status event")
            return
        await update_state(self._kv, key, lambda s: apply_status(s, data), self._seen(key))
        if provider == "smspager" and phone:  # the mailing's aggregate, beside the number
            mailing = kv_key(provider, data["message_id"])
            await update_state(
                self._kv, mailing, lambda s: apply_to_mailing(s, data), self._seen(mailing)
            )

    def _seen(self, key: str) -> tuple[MessageState | None, int] | None:
        return self._index.entry(key) if self._index is not None else None

    async def _dead_letter(self, msg: Msg, provider: str, reason: str) -> None:
        event = deadletter_event(
            self._prefix,
            provider,
            f"{msg.subject}: {reason}",
            received_at=utcnow(),
            method=None,
            path=msg.subject,
            query={},
            body=msg.data,
            peer=None,
        )
        await self._publisher.publish(event)
        log.warning("track input dead-lettered", subject=msg.subject, reason=reason)
