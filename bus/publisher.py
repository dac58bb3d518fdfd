"""Publishing events durably: a JetStream ack, or else a row in the local spool.

`publish` returns only once the event is durable. While the spool holds anything, or NATS is not
connected, new events go straight to the spool, behind the ones already there, so a process never
reorders its own events and an outage costs a callback one fsync instead of a full timeout. Every
event that goes to the spool counts in `smsbus_publish_failures_total`.

A clustered stream answers 10158 ("duplicate message id is in process") while another publish of
the same `Nats-Msg-Id` is being stored, e.g. the same callback at two replicas at once: that is
not a failure; the identical message is sent again shortly and gets its (duplicate) ack.

The drainer re-publishes spooled rows oldest first with their original `Nats-Msg-Id` and deletes a
row only after JetStream acknowledged it. A publish that timed out may still have been stored;
the repeated `Nats-Msg-Id` keeps one copy within the stream's duplicate window. Beyond it, a
status event whose fact the message's state already records is dropped instead of published, and
an event that was sent without an answer longer ago than the window is looked for in the stream
around the times it was sent (bus.landed) and, when found there, counts as acknowledged.

A status event that went to the spool without its message's tracking data (its state could not be
read when the event was built: NATS away or stalled, the mirror without the message) is given it
by the drainer, from the state as it is then, before it is published (bus.state says how).

A status event is done once its state is written too (bus.projection): `publish` returns after
both. When JetStream stored the event but its state could not be written, the event goes to the
spool marked as stored, and the drainer writes only its state; a drained event is deleted from
the spool once it is stored and its state written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
import structlog

from bus.backoff import Backoff
from bus.connection import Connection
from bus.errors import EventTooLarge
from bus.events import Event, deadletter_cut, deadletter_event, utcnow
from bus.group import BatchTimeout, GroupCommit
from bus.metrics import Metrics
from bus.projection import Projection, StateNotWritten
from bus.replies import Replies, ReplyError, ack
from bus.spool import Row, Spool
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.publisher")

DRAIN_BATCH = 256
MAX_PENDING = 4000
IN_PROCESS = 10158  # JSStreamDuplicateMessageConflict
HEADERS_SIZE = len(b"NATS/1.0\r\n\r\n")  # the header block's own bytes, beside its fields
HEADERS_MOST = 512  # more than any event's whole header block
RESEND_FIRST, RESEND_CAP = 0.002, 0.05
TRACKING_WAIT = 30.0  # seconds a spooled event waits for its state to be readable
UNREADABLE_KEPT = 10_000  # rows whose state could not be read, remembered with since when
# How long before the duplicate window has passed since a send that the stream is searched for
# the event instead of trusting JetStream to drop a repeat (the server's clock against ours).
FORGOTTEN_MARGIN = 30.0
FOUND_KEPT = 100_000  # ids of events found in the stream that way, remembered (the newest)


class _AckTimeout(Exception):
    pass


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        # Completing the future also frees nats-py's slot for this publish.
        future.set_exception(_AckTimeout())


def _in_process(exc: BaseException | None) -> bool:
    return isinstance(exc, ReplyError) and exc.err_code == IN_PROCESS


# What a failed publish attempt can raise: nats-py's client and JetStream errors, and our timeout.
_ATTEMPT_ERRORS = (nats.errors.Error, _AckTimeout, asyncio.TimeoutError)

Recorded = Callable[[Event], Awaitable[bool | None]]  # None: the state cannot be read
Tracked = Callable[[Sequence[Event]], Awaitable[list[Event | None]]]
# Which of the ids given are stored on a subject between two unix times; None when too many to read.
StoredIds = Callable[[str, float, float, set[str]], Awaitable[set[str] | None]]


async def _never(event: Event) -> bool:
    return False


async def _as_they_are(events: Sequence[Event]) -> list[Event | None]:
    return list(events)


async def _none_stored(subject: str, start: float, end: float, wanted: set[str]) -> set[str] | None:
    return set()


class Publisher:
    def __init__(
        self,
        conn: Connection,
        spool: Spool,
        metrics: Metrics,
        timeout: float,
        duplicate_window: float,
        projection: Projection,
        recorded: Recorded = _never,
        commit_subject: str = "",
        tracked: Tracked = _as_they_are,
        stored_ids: StoredIds = _none_stored,
    ) -> None:
        self._conn = conn
        self._projection = projection
        self._replies = Replies(conn.nc)
        self._group = GroupCommit(
            conn.nc, self._replies, commit_subject, self._publish_acked, self._count_ack, timeout,
            sized=metrics.publish_batch.observe,
        )  # fmt: skip
        self._spool = spool
        self._metrics = metrics
        self._timeout = timeout
        self._window = duplicate_window
        self._recorded = recorded  # is this status fact already in the message's state?
        self._tracked = tracked  # spooled events given their message's tracking data
        self._stored_ids = stored_ids  # what the stream holds (bus.landed)
        # Ids found in the stream by a search: a later spooled copy of the same fact (spooled
        # before the first one's search, a repeated callback) is not published either.
        self._found: dict[str, None] = {}
        self._unreadable: dict[int, float] = {}  # spool seq: when its state was first unreadable
        self._wake = asyncio.Event()
        self._degraded = False
        # The stream's own limit on a message, headers included, where an operator set one
        # (bus.core reads it again every few seconds); -1: none.
        self.max_msg_size = -1

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    def group_commit(self, enabled: bool) -> None:
        """Publish events of one loop turn as one fast batch (the stream takes them)."""
        self._group.enabled = enabled

    async def start(self) -> None:
        await self._replies.start()

    async def stop(self) -> None:
        await self._replies.stop()

    def _limit(self) -> tuple[int, str]:
        """What the server stores of one message at most, headers included, and the setting
        that says so."""
        limit = self._conn.nc.max_payload
        if 0 < self.max_msg_size < limit:
            return self.max_msg_size, "the stream's max_msg_size"
        return limit, "its max_payload"

    def too_large(self, event: Event) -> EventTooLarge | None:
        """The error for an event larger than the server takes (`max_payload`, which counts the
        headers too, and a server sent one closes the connection; or the stream's own
        `max_msg_size`): no publish or spool could ever store it."""
        limit, which = self._limit()
        if not limit or len(event.payload) + HEADERS_MOST <= limit:
            return None  # the callback's path: one comparison
        size = (
            len(event.payload)
            + HEADERS_SIZE
            + sum(len(k) + len(v) + 4 for k, v in event.headers.items())
        )
        if size <= limit:
            return None
        return EventTooLarge(
            f"the event would be {size} bytes; NATS takes at most {limit} ({which})"
        )

    def fitted(self, event: Event) -> Event:
        """The event, if the server takes one of its size; a dead letter larger than that cut
        to fit (bus.events.deadletter_cut); else EventTooLarge."""
        if (error := self.too_large(event)) is None:
            return event
        if event.type == "deadletter":
            event = deadletter_cut(event, self._limit()[0] - HEADERS_MOST)
            if self.too_large(event) is None:
                return event
        raise error

    async def publish(self, event: Event) -> str:
        """Make the event durable; return "published" or "spooled", or raise PublishError
        (EventTooLarge for an event the server could never take, which is not spooled; a dead
        letter is cut to fit instead)."""
        event = self.fitted(event)
        self._count(event)
        sent_at = None
        if self._spool.depth == 0 and self._conn.is_connected:
            # The event and its state share the publish timeout: past it, the spool.
            deadline = asyncio.get_running_loop().time() + self._timeout
            sent_at = time.time()
            try:
                await self._group.publish(event)
            except (*_ATTEMPT_ERRORS, BatchTimeout) as exc:
                self._enter_degraded(exc)
            else:
                try:
                    await self._projection.write(event, deadline)
                except StateNotWritten as exc:
                    await self._owe_state(event, exc)
                return "published"
        else:
            self._enter_degraded(None)
        await self._to_spool(event, sent_at)
        return "spooled"

    async def spool(self, event: Event) -> str:
        """Make the event durable in the spool, whatever NATS's state: for an event the drainer
        is to give its message's tracking data (its state could not be read when it was built);
        "spooled", or PublishError when not even the spool takes it."""
        event = self.fitted(event)
        self._count(event)
        await self._to_spool(event)
        return "spooled"

    def _count(self, event: Event) -> None:
        if event.type == "deadletter":
            self._metrics.deadletters.labels(event.provider).inc()

    async def _to_spool(self, event: Event, sent_at: float | None = None) -> None:
        """The event could not be stored now: the spool keeps it, the drainer publishes it.
        `sent_at`: when it was sent without an answer (it may be stored)."""
        self._metrics.publish_failures.inc()
        await self._spool.append(event, sent_at=sent_at)
        self._wake.set()

    async def publish_many(self, events: Sequence[Event]) -> None:
        """`publish` for many events at once, without a task for each: queued in one loop turn,
        so that their acks and state writes share batches, in the order given. Every event is
        made durable (stored, or spooled) before this returns; PublishError, or whatever else a
        publish raised, comes after that."""
        fast = self._group.enabled and self._spool.depth == 0 and self._conn.is_connected
        if not fast or any(self.too_large(event) for event in events):
            for result in await asyncio.gather(
                *(self.publish(e) for e in events), return_exceptions=True
            ):
                if isinstance(result, BaseException):
                    raise result
            return
        deadline = asyncio.get_running_loop().time() + self._timeout
        for event in events:
            self._count(event)
        sent_at = time.time()
        acks = [self._group.submit(event) for event in events]
        await asyncio.wait(acks)
        writes: list[tuple[Event, asyncio.Future[None]]] = []
        owed: list[tuple[Event, StateNotWritten]] = []
        spooled: list[Event] = []
        raised: BaseException | None = None
        for event, acked in zip(events, acks, strict=True):
            exc = acked.exception()
            if exc is None:
                try:
                    write = self._projection.submit(event, deadline)
                except StateNotWritten as not_written:
                    owed.append((event, not_written))
                    continue
                if write is not None:
                    writes.append((event, write))
            elif isinstance(exc, (*_ATTEMPT_ERRORS, BatchTimeout)):
                self._enter_degraded(exc)
                spooled.append(event)
            else:
                raised = raised or exc
        if writes:
            await asyncio.wait([write for _, write in writes])
        for event, write in writes:
            exc = write.exception()
            if isinstance(exc, StateNotWritten):
                owed.append((event, exc))
            elif exc is not None:
                raised = raised or exc
        for event, why in owed:
            await self._owe_state(event, why)
        for event in spooled:
            await self._to_spool(event, sent_at)
        if raised is not None:
            raise raised

    async def _owe_state(self, event: Event, exc: StateNotWritten) -> None:
        """The event is in the stream, its state is not: the spool keeps it until the drainer
        has written the state (PublishError when not even the spool takes it)."""
        log.warning("state write failed; owed by the spool", event_id=event.id, error=str(exc))
        self._metrics.states_owed.inc()
        await self._spool.append(event, stored=True)
        self._wake.set()

    async def run(self, beat: Beat) -> None:
        """The drainer (supervised): publishes what the spool holds, also what an earlier run left
        there, whenever there is something and NATS is connected."""
        self._wake.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            beat()
            self._wake.clear()
            if self._spool.depth:
                await self._drain(beat)
            elif self._spool.undeleted:  # the disk refused their deletion: try again
                await self._spool.delete([])

    def wake(self) -> None:
        self._wake.set()

    async def flush(self, timeout: float) -> None:
        """The last attempt to empty the spool, bounded in time (waiting for NATS to come back
        if need be); what is left stays for the next start."""
        if self._spool.depth:
            log.info("draining the spool before exit", spool_depth=self._spool.depth,
                     timeout_s=timeout)  # fmt: skip
            try:
                await asyncio.wait_for(self._drain(), timeout)
            except TimeoutError:
                pass
            except (sqlite3.Error, OSError) as exc:
                log.error("the spool cannot be read or written", error=str(exc))
        await self._spool.delete([])  # rows whose deletion the disk refused, if any
        if self._spool.depth or self._spool.undeleted:
            log.warning("spool kept for the next start", spool_depth=self._spool.depth,
                        published_not_deleted=self._spool.undeleted)  # fmt: skip

    async def _publish_acked(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        resend: Backoff | None = None
        while True:
            future, started = await self._send(event)
            handle = loop.call_at(deadline, _expire, future)
            try:
                ack(await future)
            except ReplyError as exc:
                resend = resend or Backoff(RESEND_FIRST, RESEND_CAP)
                wait = resend.failed()
                if not _in_process(exc) or loop.time() + wait >= deadline:
                    raise
                self._metrics.publish_resends.inc()
                await asyncio.sleep(wait)  # another publish of this id is being stored
                continue
            finally:
                handle.cancel()
            self._count_ack(event, started)
            return

    async def _send(self, event: Event) -> tuple[asyncio.Future[Any], float]:
        # Past MAX_PENDING unacknowledged publishes NATS is stalled: fail over to the spool
        # rather than pile up more.
        if self._replies.pending >= MAX_PENDING:
            raise _AckTimeout()
        started = time.perf_counter()
        future = await self._replies.request(event.subject, event.payload, event.headers)
        return future, started

    def _count_ack(self, event: Event, started: float) -> None:
        self._metrics.publish_duration.observe(time.perf_counter() - started)
        counter = self._metrics.published.get((event.type, event.provider))
        if counter is not None:  # registrations on track subjects are inputs, not events
            counter.inc()

    def _enter_degraded(self, exc: BaseException | None) -> None:
        if not self._degraded:
            self._degraded = True
            if exc is None:
                reason = "NATS is not connected"
            elif isinstance(exc, _AckTimeout | BatchTimeout):
                reason = "no ack in time"
            else:
                reason = type(exc).__name__
            log.warning("publishing to the spool", reason=reason, timeout_s=self._timeout)

    async def _drain(self, beat: Beat | None = None) -> None:
        backoff = Backoff(0.1, 5.0)
        published = 0
        told: set[str] = set()  # why rows were held back, said once per drain
        while self._spool.depth:
            if beat is not None:
                beat()
            if not self._conn.is_connected:
                await self._pause(backoff.failed())
                continue
            rows = await self._spool.head(DRAIN_BATCH)
            if large := await self._dead_letter_too_large(rows):
                rows = [row for row in rows if row not in large]
            dropped, held = await self._already_recorded(rows)
            if held is not None:  # its state cannot be read yet: it and those after it wait
                rows = rows[:held]
            if dropped:
                await self._spool.delete([row.seq for row in dropped])
                rows = [row for row in rows if row not in dropped]
            rows, tracking = await self._with_tracking(rows)
            landed, unchecked = await self._landed(rows)
            if unchecked is not None:  # the stream could not be searched: those wait
                rows = rows[:unchecked]
            why = {"their message's state cannot be read": held is not None or tracking,
                   "the stream cannot be searched for them": unchecked is not None}  # fmt: skip
            waiting = any(why.values())
            for reason in [r for r, now in why.items() if now and r not in told]:
                told.add(reason)
                log.info("spooled events held back", reason=reason, spool_depth=self._spool.depth)
            acked = set(
                await self._publish_batch(
                    [row for row in rows if not row.stored and row.seq not in landed]
                )
            )
            stored = [row for row in rows if row.stored or row.seq in acked or row.seq in landed]
            owed = await self._projection.write_many([row.event for row in stored])
            await self._spool.delete([row.seq for row in stored if row.event.id not in owed])
            await self._spool.mark_stored(
                [row.seq for row in stored if row.event.id in owed and not row.stored]
            )
            published += len(acked)
            if len(stored) < len(rows) or owed or waiting:
                await self._pause(backoff.failed())
            else:
                backoff.succeeded()
        if published or self._degraded:
            self._degraded = False
            log.info("spool drained", published=published)

    async def _dead_letter_too_large(self, rows: list[Row]) -> list[Row]:
        """Rows the server would never take (its max_payload lowered since they were spooled):
        each leaves the spool for the dead-letter subject, cut to fit, rather than hold back
        every row after it for good. The dead letter goes through the spool before the row is
        deleted."""
        large = [
            (row, error) for row in rows if not row.stored and (error := self.too_large(row.event))
        ]
        for row, error in large:
            log.error("spooled event larger than NATS takes; kept as a dead letter, cut",
                      event_id=row.event.id, error=str(error))  # fmt: skip
            letter = self.fitted(
                deadletter_event(
                    row.event.subject.split(".", 1)[0],
                    row.event.provider,
                    f"spooled {row.event.type} event {row.event.id} refused: {error}",
                    received_at=utcnow(),
                    method=None,
                    path="spool",
                    query={},
                    body=row.event.payload,
                    peer=None,
                )
            )
            self._count(letter)
            await self._spool.append(letter)
        if large:
            await self._spool.delete([row.seq for row, _ in large])
        return [row for row, _ in large]

    async def _with_tracking(self, rows: list[Row]) -> tuple[list[Row], bool]:
        """Rows whose events are not stored yet, given their message's tracking data where they
        went to the spool without it (`States.with_tracking`), and whether the rest waits: an
        event whose state cannot be read yet is held (with every row after it, so the spool's
        order stays) until it can, or until it has been in the spool for TRACKING_WAIT; then it
        goes as it is."""
        fresh = [i for i, row in enumerate(rows) if not row.stored]
        if not fresh:
            return rows, False
        events = await self._tracked([rows[i].event for i in fresh])
        given, waiting = 0, False
        rows = list(rows)
        cutoff = time.time() - TRACKING_WAIT
        for i, event in zip(fresh, events, strict=True):
            if event is None:
                if rows[i].spooled_at > cutoff:
                    del rows[i:]
                    waiting = True
                    break
            elif event is not rows[i].event:
                rows[i] = dataclasses.replace(rows[i], event=event)
                given += 1
        if given:
            log.info("spooled events given their tracking data", count=given)
        return rows, waiting

    async def _landed(self, rows: list[Row]) -> tuple[set[int], int | None]:
        """The seqs of rows whose events the stream holds although no ack came for them: among
        those sent longer ago than JetStream remembers ids, found by searching the stream
        (bus.landed), and any other copy of an event found so; and, when the stream could not
        be searched, the index of the first row that waits for it."""
        window = self._window
        forgotten = time.time() - (window - min(window / 2, FORGOTTEN_MARGIN))
        suspects = [
            (i, row.event.subject, row.sent) for i, row in enumerate(rows)
            if not row.stored and row.sent is not None and row.sent[0] <= forgotten
        ]  # fmt: skip
        spans: dict[str, tuple[float, float]] = {}
        wanted: dict[str, set[str]] = {}
        for i, subject, (first, last) in suspects:
            start, end = spans.get(subject, (first, last))
            spans[subject] = (min(start, first), max(end, last))
            wanted.setdefault(subject, set()).add(rows[i].event.id)
        held: dict[str, set[str]] = {}
        for subject, (start, end) in spans.items():
            try:
                ids = await self._stored_ids(subject, start, end + self._timeout, wanted[subject])
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("stream not searched for spooled events; they wait",
                            error=str(exc) or type(exc).__name__)  # fmt: skip
                return set(), suspects[0][0]
            if ids is None:
                log.warning("too many messages to search for spooled events; publishing them",
                            subject=subject)  # fmt: skip
                continue
            held[subject] = ids
        for i, subject, _ in suspects:
            if rows[i].event.id in held.get(subject, ()):
                self._found[rows[i].event.id] = None
        while len(self._found) > FOUND_KEPT:
            del self._found[next(iter(self._found))]
        found = {row.seq for row in rows if not row.stored and row.event.id in self._found}
        if found:
            log.info("spooled events found in the stream; not published again", count=len(found))
        return found, None

    async def _already_recorded(self, rows: list[Row]) -> tuple[list[Row], int | None]:
        """Spooled status events older than the duplicate window whose fact the state records
        (the same fact stored from elsewhere, or a publish that timed out but landed, and was
        applied): JetStream would not drop the repeat any more, so we do. And the index of the
        first such event whose state cannot be read: it waits, with the rows after it, for up to
        TRACKING_WAIT from its first failed read, then goes as it is."""
        cutoff = time.time() - self._window
        old = [
            (i, r) for i, r in enumerate(rows) if r.event.type == "status" and r.spooled_at < cutoff
        ]
        if not old:
            return [], None
        found = await asyncio.gather(*(self._recorded(r.event) for _, r in old))
        dropped, held, now = [], None, time.monotonic()
        for (i, row), recorded in zip(old, found, strict=True):
            if recorded is None:
                if len(self._unreadable) >= UNREADABLE_KEPT:
                    self._unreadable.clear()
                since = self._unreadable.setdefault(row.seq, now)
                if now - since < TRACKING_WAIT:
                    if since == now:
                        log.warning("spooled facts wait for their state to be readable",
                                    event_id=row.event.id, wait_s=TRACKING_WAIT)  # fmt: skip
                    held = i
                    break
                log.warning("state still unreadable; spooled fact published as it is",
                            event_id=row.event.id)  # fmt: skip
            self._unreadable.pop(row.seq, None)
            if recorded:
                dropped.append(row)
        if dropped:
            log.info("spooled facts already recorded; dropped", count=len(dropped))
        return dropped, held

    async def _publish_batch(self, rows: list[Row]) -> list[int]:
        """Publish rows pipelined, sent in spool order; return the seqs JetStream acknowledged.
        Rows sent without an answer are marked so in the spool (the stream may hold them)."""
        sent: list[tuple[Row, asyncio.Future[Any], float]] = []
        sent_at = time.time()
        with contextlib.suppress(*_ATTEMPT_ERRORS):  # the rest waits for the next try
            for row in rows:
                future, started = await self._send(row.event)
                sent.append((row, future, started))
        if not sent:
            return []
        loop = asyncio.get_running_loop()
        handles = [loop.call_later(self._timeout, _expire, future) for _, future, _ in sent]
        await asyncio.wait([future for _, future, _ in sent])
        for handle in handles:
            handle.cancel()
        acked, unanswered = [], []
        for row, future, started in sent:
            exc = _AckTimeout() if future.cancelled() else future.exception()
            if exc is None:
                try:
                    ack(future.result())
                except ReplyError as refused:
                    exc = refused
            if _in_process(exc):
                try:
                    await self._publish_acked(row.event)
                except _ATTEMPT_ERRORS:
                    unanswered.append(row.seq)
                else:
                    acked.append(row.seq)
            elif exc is None:
                self._count_ack(row.event, started)
                acked.append(row.seq)
            elif isinstance(exc, _ATTEMPT_ERRORS):
                unanswered.append(row.seq)
            else:
                log.error("spooled event refused", error=str(exc), event_id=row.event.id)
        await self._spool.mark_sent(unanswered, sent_at)
        return acked

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when NATS comes back."""
        change = self._conn.change()
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._wake, change)]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()
