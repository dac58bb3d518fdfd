"""The projector: a durable JetStream consumer that turns the stream into current state.

It reads `<prefix>.track.>` (registrations published by the sending app) and `<prefix>.status.>`
(status events) in stream order and writes each message's state into the `<STREAM>_messages`
bucket, acknowledging a stream message only after its state is stored. Writes are compare-and-set
on the key's revision, so several replicas sharing the durable consumer never overwrite each other.
Junk on `track` goes to the dead-letter subject and is acknowledged: it will never parse.

The consumer is durable, so it resumes where the group left off however the connection went; the
loop re-binds (and re-creates the consumer, should a new server not have it) whenever a fetch
fails, and a reconnect cuts short the fetch that was waiting on the old connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from bus.backoff import Backoff
from bus.connection import Connection
from bus.errors import PayloadError, PublishError
from bus.events import PER_PHONE, deadletter_event, message_key, rfc3339, utcnow
from bus.messages import (
    MessageState,
    apply_status,
    apply_to_mailing,
    kv_key,
    parse_track_batch,
    register,
    with_trace,
)
from bus.metrics import Metrics
from bus.publisher import Publisher
from bus.state import Change, States
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.projector")

DURABLE = "smsbus-projector"
BATCH = 256
FETCH_WAIT = 1.0
RETRY_AFTER = 1.0  # seconds before a message whose write failed is delivered again
ACK_WAIT = 5.0
CALL_TIMEOUT = 2.0  # binding again after a reconnect: retried soon while a leader is elected
# Keys written at once. More makes bursts of ack handling that hold the event loop (and the
# callbacks waiting on it) for tens of milliseconds; 16 keeps each burst near a millisecond.
CONCURRENCY = 16
_STATUS_FIELDS = ("provider", "message_id", "status", "final", "provider_status", "occurred_at")


@dataclass(eq=False)
class _Plan:
    """What one stream message does: state changes, then `stored` once they are written; or, for
    junk, a dead letter (provider, reason)."""

    msg: Msg
    changes: list[tuple[str, Change]]
    stored: Callable[[], None] | None = None
    dead_letter: tuple[str, str] | None = None


class Projector:
    def __init__(
        self,
        conn: Connection,
        states: States,
        publisher: Publisher,
        stream: str,
        prefix: str,
        metrics: Metrics,
    ) -> None:
        self._conn = conn
        self._metrics = metrics
        self._states = states
        self._publisher = publisher
        self._stream = stream
        self._prefix = prefix
        self.state = "starting"  # starting | following | re-establishing
        self.pending = 0

    def public(self) -> dict[str, object]:
        return {"state": self.state, "pending": self.pending}

    @property
    def behind(self) -> bool:
        return self.state != "following"

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
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

    async def ensure(self, js: JetStreamContext) -> None:
        """Create or update the durable consumer (the same call on every replica)."""
        await js.add_consumer(self._stream, self.config())

    async def run(self, beat: Beat) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            if not self._conn.is_connected:
                self.state = "re-establishing"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._conn.connected(), 1.0)
                beat()
                continue
            change = self._conn.change()
            try:
                js = self._conn.jetstream(timeout=CALL_TIMEOUT)
                await self.ensure(js)
                sub = await js.pull_subscribe_bind(durable=DURABLE, stream=self._stream)
            except (TimeoutError, nats.errors.Error) as exc:
                self.state = "re-establishing"
                log.warning("projector not bound yet", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(backoff.failed())
                beat()
                continue
            backoff.succeeded()
            self.state = "following"
            try:
                await self._consume(sub, change, beat)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            self.state = "re-establishing"

    async def _consume(
        self, sub: JetStreamContext.PullSubscription, change: asyncio.Event, beat: Beat
    ) -> None:
        """Fetch and apply until the connection changes or a fetch fails for real."""
        while not change.is_set():
            beat()
            fetch = asyncio.ensure_future(sub.fetch(BATCH, timeout=FETCH_WAIT))
            changed = asyncio.ensure_future(change.wait())
            try:
                await asyncio.wait({fetch, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                if not fetch.done():
                    fetch.cancel()  # its messages, if any arrive, come back after ACK_WAIT
                    with contextlib.suppress(
                        asyncio.CancelledError, TimeoutError, nats.errors.Error
                    ):
                        await fetch
            if fetch.cancelled():
                return
            try:
                msgs = fetch.result()
            except TimeoutError:  # nats.errors.TimeoutError is one too: nothing to do
                self.pending = 0
                continue
            except nats.errors.Error as exc:
                log.warning("projector fetch failed", error=str(exc) or type(exc).__name__)
                return
            self.pending = msgs[-1].metadata.num_pending if msgs else 0
            await self._apply(msgs)

    async def _apply(self, msgs: list[Msg]) -> None:
        """Store what a fetched batch changes (each key written once, however many of its
        messages the batch holds), then acknowledge each message whose keys are all stored. A
        message with a key not stored comes back after RETRY_AFTER with every later message
        about that key, in stream order (after ACK_WAIT if even the nak is lost); applying one
        twice changes nothing."""
        plans = [self._plan(msg) for msg in msgs]
        # Key by key, not as one atomic batch: nats-server stores an atomic batch in one go, and
        # while it does, the callbacks' events on the same connection wait (bench/callback.py
        # ran at half the rate, twice the p99, with batches of 8 to 1000).
        failed = await self._states.apply(
            [change for plan in plans for change in plan.changes], CONCURRENCY, atomic=False
        )
        lost = await self._dead_letters([plan for plan in plans if plan.dead_letter])
        if failed or lost:
            error = next(iter(failed.values()), None) or next(iter(lost.values()))
            log.warning("projector write failed", messages=len(lost), keys=len(failed),
                        error=str(error) or type(error).__name__)  # fmt: skip
        with contextlib.suppress(nats.errors.Error):
            for plan in plans:
                if plan in lost or any(key in failed for key, _ in plan.changes):
                    await plan.msg.nak(delay=RETRY_AFTER)
                    continue
                if plan.stored is not None:
                    plan.stored()
                await plan.msg.ack()

    async def _dead_letters(self, plans: list[_Plan]) -> dict[_Plan, PublishError]:
        """Publish the dead letters of junk; those not kept (not even by the spool)."""
        if not plans:
            return {}
        results = await asyncio.gather(
            *(self._dead_letter(plan.msg, *plan.dead_letter) for plan in plans if plan.dead_letter),
            return_exceptions=True,
        )
        lost = {}
        for plan, result in zip(plans, results, strict=True):
            if isinstance(result, PublishError):
                lost[plan] = result
            elif isinstance(result, BaseException):
                raise result
        return lost

    def _plan(self, msg: Msg) -> _Plan:
        """Decode a stream message once: the state changes it makes (in stream order per key),
        what to do once they are stored, or the dead letter that junk becomes."""
        kind, provider = msg.subject.split(".")[1:3]
        if kind == "track":
            try:
                items = parse_track_batch(msg.data, provider_hint=provider)
                items = with_trace(items, (msg.headers or {}).get("traceparent"))
            except PayloadError as exc:
                return _Plan(msg, [], dead_letter=(provider, str(exc)))
            stamp = msg.metadata.timestamp
            at = rfc3339(stamp) if stamp else rfc3339(utcnow())
            changes: list[tuple[str, Change]] = [
                (kv_key(i.provider, i.message_id), partial(register, item=i, at=at)) for i in items
            ]
            return _Plan(msg, changes)
        try:
            event = orjson.loads(msg.data)
            data, event_id = event["data"], str(event["id"])
            complete = isinstance(data, dict) and all(f in data for f in _STATUS_FIELDS)
        except (orjson.JSONDecodeError, KeyError, TypeError):
            complete = False
        if not complete:
            return _Plan(msg, [], dead_letter=(provider, "not a status event"))
        return self._status(msg, data, event_id)

    def _status(self, msg: Msg, data: dict[str, Any], event_id: str) -> _Plan:
        provider, phone = data["provider"], data.get("phone")
        key = kv_key(provider, message_key(provider, data["message_id"], phone))
        seen: dict[str, MessageState | None] = {}

        def change(state: MessageState | None) -> MessageState:
            seen["before"] = state  # the state this write started from, on the attempt that wins
            seen["after"] = after = apply_status(state, data, event_id)
            return after

        changes: list[tuple[str, Change]] = [(key, change)]
        if provider in PER_PHONE and phone:  # the send as a whole, beside the number

            def to_mailing(state: MessageState | None) -> MessageState:
                seen["mailing"] = mailing = apply_to_mailing(state, data)
                return mailing

            changes.append((kv_key(provider, data["message_id"]), to_mailing))

        def stored() -> None:
            # Compare-and-set lets one write, on one replica, take a message to its first final.
            before, after = seen.get("before"), seen.get("after")
            if after is not None and after.final and not (before is not None and before.final):
                self._delivered(seen.get("mailing") or after, data)

        return _Plan(msg, changes, stored=stored)

    def _delivered(self, registered: MessageState, data: dict[str, Any]) -> None:
        """Observe smsbus_delivery_seconds: from `sent_at`, else the registration, to when the
        provider says the final status happened. An untracked message has neither: not
        counted."""
        start = registered.sent_at or registered.registered_at
        end = data.get("occurred_at") or data.get("received_at")
        if not start or not end:
            return
        try:
            seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        except (TypeError, ValueError):
            return
        status = str(data["status"])
        self._metrics.delivery.labels(registered.provider, status).observe(max(0.0, seconds))

    async def _dead_letter(self, msg: Msg, provider: str, reason: str) -> None:
        """Junk on the stream, kept on the dead-letter subject (PublishError when not even the
        spool takes it)."""
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
