"""The projector: a durable JetStream consumer that applies registrations published on the stream.

It reads `<prefix>.track.>` (registrations the sending app publishes on NATS) in stream order and
writes each message's registration into the `<STREAM>_messages` bucket, acknowledging a stream
message only after its states are stored. Writes are compare-and-set on the key's revision, so
several replicas sharing the durable consumer never overwrite each other. Junk on `track` goes to
the dead-letter subject and is acknowledged: it will never parse. (Status events need no
consumer: the replica that publishes one writes its state, bus.projection.)

The consumer is durable, so it resumes where the group left off however the connection went; the
loop re-binds (and re-creates the consumer, should a new server not have it) whenever a fetch
fails, and a reconnect cuts short the fetch that was waiting on the old connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from functools import partial

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.client import JetStreamContext

from bus.backoff import Backoff
from bus.connection import Connection
from bus.errors import PayloadError, PublishError
from bus.events import deadletter_event, rfc3339, utcnow
from bus.messages import kv_key, parse_track_batch, register, with_trace
from bus.projection import payload_status_data, status_change
from bus.publisher import Publisher
from bus.state import Change, States
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.projector")

DURABLE = "smsbus-track"
# The consumer of earlier releases, which projected status events too (filter track and status).
LEGACY = "smsbus-projector"
LEGACY_CHECK_EVERY = 30.0
BATCH = 256
FETCH_WAIT = 1.0
RETRY_AFTER = 1.0  # seconds before a message whose write failed is delivered again
ACK_WAIT = 5.0
CALL_TIMEOUT = 2.0  # binding again after a reconnect: retried soon while a leader is elected
# Keys written at once. More makes bursts of ack handling that hold the event loop (and the
# callbacks waiting on it) for tens of milliseconds; 16 keeps each burst near a millisecond.
CONCURRENCY = 16


@dataclass(eq=False)
class _Plan:
    """What one stream message does: state changes, or, for junk, a dead letter (provider,
    reason)."""

    msg: Msg
    changes: list[tuple[str, Change]]
    dead_letter: tuple[str, str] | None = None


def _after_acked(info: ConsumerInfo) -> int:
    """The stream sequence after everything the consumer has acknowledged."""
    return (info.ack_floor.stream_seq if info.ack_floor else 0) + 1


async def _legacy_floor(js: JetStreamContext, stream: str) -> int | None:
    """The stream sequence after what the earlier release's consumer acknowledged; None when
    there is no such consumer."""
    try:
        info = await js.consumer_info(stream, LEGACY)
    except nats.js.errors.NotFoundError:
        return None
    return _after_acked(info)


class Projector:
    def __init__(
        self,
        conn: Connection,
        states: States,
        publisher: Publisher,
        stream: str,
        prefix: str,
    ) -> None:
        self._conn = conn
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
            filter_subjects=[f"{self._prefix}.track.>"],
        )

    async def ensure(self, js: JetStreamContext) -> None:
        """Create or update the durable consumer (the same call on every replica). Created
        where an earlier release's consumer exists, it starts after what that one acknowledged,
        so no registration published on NATS is skipped or replayed from the stream's start."""
        config = self.config()
        try:
            held = (await js.consumer_info(self._stream, DURABLE)).config
        except nats.js.errors.NotFoundError:
            start = await _legacy_floor(js, self._stream)
            if start is not None:
                config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start
        else:  # where it starts cannot change
            config.deliver_policy, config.opt_start_seq = held.deliver_policy, held.opt_start_seq
        await js.add_consumer(self._stream, config)

    async def retire_legacy(self, beat: Beat) -> None:
        """Releases before status states were written through projected every status event
        with a consumer of their own (LEGACY). While one of them still pulls from it, leave it;
        once none has for two checks in a row, apply what it had not acknowledged (status
        events and registrations, up to the stream's end: applying twice changes nothing) and
        delete it. A one-shot job: it returns when there is no such consumer."""
        idle = 0
        while True:
            beat()
            js = self._conn.jetstream(timeout=CALL_TIMEOUT)
            try:
                info = await js.consumer_info(self._stream, LEGACY)
            except nats.js.errors.NotFoundError:
                return
            idle = 0 if info.num_waiting else idle + 1
            if idle >= 2:
                applied = await self._catch_up(js, _after_acked(info), beat)
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_consumer(self._stream, LEGACY)
                log.info("earlier release's consumer retired", consumer=LEGACY, applied=applied)
                return
            await asyncio.sleep(LEGACY_CHECK_EVERY)

    async def _catch_up(self, js: JetStreamContext, start: int, beat: Beat) -> int:
        """Apply the status events and registrations from `start` to the stream's last message
        now; how many stream messages that was. NATS errors pass through (the job is retried)."""
        last = (await js.stream_info(self._stream)).state.last_seq
        applied = 0
        for kind in ("status", "track"):
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                ack_policy=AckPolicy.NONE, inactive_threshold=60.0,
            )  # fmt: skip
            sub = await js.pull_subscribe(f"{self._prefix}.{kind}.>", stream=self._stream,
                                          config=config)  # fmt: skip
            try:
                done = start > last
                while not done:
                    beat()
                    try:
                        msgs = await sub.fetch(BATCH, timeout=FETCH_WAIT)
                    except TimeoutError:
                        break
                    msgs = [m for m in msgs if m.metadata.sequence.stream <= last]
                    done = not msgs or msgs[-1].metadata.sequence.stream >= last
                    changes = [change for msg in msgs for change in self._changes(kind, msg)]
                    failed = await self._states.apply(changes, batches="fast")
                    if failed:
                        raise next(iter(failed.values()))
                    applied += len(msgs)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        return applied

    def _changes(self, kind: str, msg: Msg) -> list[tuple[str, Change]]:
        if kind == "track":
            return self._plan(msg).changes
        event_id = (msg.headers or {}).get("Nats-Msg-Id")  # every event carries its id here
        data = payload_status_data(msg.data)
        return status_change(event_id, data).changes if event_id and data is not None else []

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
            [change for plan in plans for change in plan.changes], CONCURRENCY, batches="none"
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
        """Decode a stream message once: the registrations it makes, or the dead letter that junk
        becomes."""
        provider = msg.subject.split(".")[2]
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
