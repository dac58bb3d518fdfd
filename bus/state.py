"""Message state: the `<STREAM>_messages` bucket, its local mirror, and the rules for reading and
writing it.

Reads go to the mirror first and to the bucket when the mirror does not hold the key, so a state
written a moment ago by another replica is never missed (CONTRACT.md section 3, read your writes);
bucket reads have a connection of their own (bus.connection says why).
A bucket read must see every write acknowledged before it: on a replicated bucket it asks the
stream leader (`STREAM.MSG.GET`; a direct get may be answered by a replica that is behind); on a
bucket with one replica, that replica is the leader, so reads use direct gets, and the reads of
one event-loop turn go out as one batched request (`multi_last`, nats-server 2.11+; a server
before it reads such a request as an empty one and answers 408, after which every key is read
with a get of its own, until the next reconnection).
Writes are compare-and-set on the key's revision, starting from the mirror's copy (no read when it
is current), and what this process wrote is put into the mirror as soon as it is acknowledged.
A bucket that lost what it held (a NATS server back on an empty store, the bucket deleted) gets
back what this replica's mirror held (`write_back`): the open tracked messages, and the recent
states with the facts they record; until each is written, a read finds it where it was held,
merged with the bucket's copy as the write-back will merge them.
A registration request's writes go out as atomic batches (nats-server 2.12+, the bucket's
`allow_atomic`): every write of a batch keeps its own expected revision, the server stores all of
them or none, and one acknowledgement answers the batch. A batch refused as a whole (another
writer got to one of its keys first, or a key the mirror does not hold exists) or unanswered is
written again key by key, each with its own compare-and-set loop; applying a change to a state
that already has it changes nothing. The projector writes key by key (bus.projector says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Literal

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from nats.nuid import NUID

from bus import fastbatch, packed, wire
from bus.backoff import Backoff
from bus.connection import Connection
from bus.events import Event, message_key, untracked_message, with_tracking
from bus.follow import Follower
from bus.index import MessageIndex
from bus.messages import MessageState, TrackItem, kv_key, register, restore
from bus.replies import WRONG_LAST, Replies, ReplyError, ack, stored, time_out
from bus.stream import state_commit_subject
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.state")

CAS_ATTEMPTS = 50
WRITES_AT_ONCE = 64  # concurrent writes of one batch of registrations
READ_TIMEOUT = 2.0
LOOKUP_TIMEOUT = 1.0  # a callback or poll waits this long at most for the bucket
BATCH_READ = 200  # keys per batched direct get (the server answers at most 1024)
BATCH_TIMEOUT = LOOKUP_TIMEOUT  # for each reply of a batched direct get
NOT_BATCHED = 408  # a direct get's status when the server does not read `multi_last` (before 2.11)
ATOMIC_BATCH = 250  # writes per atomic batch (the server takes at most 1000)
ATOMIC_IN_FLIGHT = 8  # atomic batches open at once (the server allows 50 per stream)
WRITE_BACK = 1000  # states written back at a time

Change = Callable[[MessageState | None], MessageState]
Batches = Literal["atomic", "fast", "none"]
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"


async def read_state(kv: KeyValue, key: str) -> tuple[MessageState | None, int]:
    """A key's state and revision; (None, 0) when there is none. NATS errors pass through."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None, 0
    return (MessageState.from_json(entry.value) if entry.value else None), entry.revision or 0


class States:
    def __init__(
        self,
        conn: Connection,
        kv: KeyValue,
        bucket: str,
        on_open: Callable[[str, int], None] = lambda p, n: None,
        direct: bool = False,
        on_batch: Callable[[str], None] = lambda outcome: None,
        reads: Connection | None = None,
        on_read_failed: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_batch = on_batch  # "stored" or "refused", per atomic batch
        self._on_read_failed = on_read_failed
        self._reads_failing = False  # since the last read that succeeded
        self._conn = conn
        self.kv = kv
        self._replies = Replies(conn.nc)
        # Bucket reads on a connection of their own in the service (bus.connection says why).
        self._reads = reads or conn
        self._read_replies = Replies(self._reads.nc) if reads is not None else self._replies
        self._direct = direct
        self._get = f"$JS.API.STREAM.MSG.GET.KV_{bucket}"
        self._direct_get = f"$JS.API.DIRECT.GET.KV_{bucket}"
        self._subject = f"$KV.{bucket}."
        self._queued: dict[str, list[asyncio.Future[tuple[MessageState | None, int]]]] = {}
        self._flush_soon = False
        self.batched_reads = True  # until the server answers a batched get as an empty request
        self._batches: set[asyncio.Task[None]] = set()
        self._nuid = NUID()
        self._atomic_gate = asyncio.Semaphore(ATOMIC_IN_FLIGHT)
        self._batch_gate = asyncio.Semaphore(ATOMIC_IN_FLIGHT)
        self._commit = state_commit_subject(bucket)
        self.atomic = False  # set once the bucket is known to take atomic batches
        self.batched = False  # ... and fast batches
        self.mirror = MessageIndex(bucket, on_open=on_open, floor=lambda: self.follower.last)
        self.follower = Follower.of_bucket(
            conn, "state-mirror", bucket, self.mirror.apply, on_reset=self._bucket_lost
        )
        # What the mirror held when the bucket lost it, to write back: by provider and message
        # key, packed (bus.packed), as the mirror held it.
        self._lost: dict[str, dict[str, bytes]] = {}
        self._losing = 0  # states to write back since the bucket was lost
        self._lost_since = 0.0
        self._lost_now = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._conn.is_connected

    async def start(self) -> None:
        await self._replies.start()
        if self._read_replies is not self._replies:
            await self._read_replies.start()

    async def stop(self) -> None:
        await self._replies.stop()
        if self._read_replies is not self._replies:
            await self._read_replies.stop()

    async def read(
        self, key: str, timeout: float = READ_TIMEOUT
    ) -> tuple[MessageState | None, int]:
        """The bucket leader's copy of a key, and its revision ((None, 0) when there is none).
        NATS errors pass through, and TimeoutError after `timeout` (BATCH_TIMEOUT for a batched
        direct get)."""
        if self._direct:
            queued: asyncio.Future[tuple[MessageState | None, int]]
            queued = asyncio.get_running_loop().create_future()
            self._queued.setdefault(key, []).append(queued)
            if not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)
            return await queued  # the batch bounds the wait (BATCH_TIMEOUT)
        request = orjson.dumps({"last_by_subj": self._subject + key})
        future = await self._read_replies.request(self._get, request)
        try:
            found = stored(await asyncio.wait_for(future, timeout))
        finally:
            future.cancel()
        if found is None:
            return None, 0
        data, revision = found
        return (MessageState.from_json(data) if data else None), revision

    def _flush(self) -> None:
        self._flush_soon = False
        queued, self._queued = self._queued, {}
        keys = list(queued)
        size = BATCH_READ if self.batched_reads else 1
        for start in range(0, len(keys), size):
            self._read_soon({k: queued[k] for k in keys[start : start + size]})

    def _read_soon(
        self, batch: dict[str, list[asyncio.Future[tuple[MessageState | None, int]]]]
    ) -> None:
        task = asyncio.create_task(self._read_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _read_batch(
        self, batch: dict[str, list[asyncio.Future[tuple[MessageState | None, int]]]]
    ) -> None:
        """One direct get for many keys: a reply per key found, then a status (204 end of
        batch, or 404 when none was found); for one key, its value or a 404. The replies are
        read as they arrive (bus.replies routes them here), the wait bounded by BATCH_TIMEOUT."""
        subjects = [self._subject + key for key in batch]
        reading = _Reading(self._subject, single=len(subjects) == 1)
        token = self._nuid.next().decode()
        self._read_replies.route(token, reading.on_reply)
        expiry = asyncio.get_running_loop().call_later(BATCH_TIMEOUT, reading.expire)
        try:
            if len(subjects) == 1:  # the server's cheapest read: the key in the subject
                subject, request = f"{self._direct_get}.{subjects[0]}", b""
            else:
                subject = self._direct_get
                request = orjson.dumps({"multi_last": subjects, "batch": len(subjects)})
            await self._reads.nc.publish(subject, request, reply=self._read_replies.prefix + token)
            await reading.done
        except (TimeoutError, nats.errors.Error) as exc:
            reading.error = reading.error or exc
        finally:
            expiry.cancel()
            self._read_replies.unroute(token)
        error = reading.error
        if len(subjects) > 1 and isinstance(error, ReplyError) and error.code == NOT_BATCHED:
            if self.batched_reads:
                self.batched_reads = False
                log.warning("NATS does not take batched reads (nats-server 2.11+); "
                            "reading the state bucket key by key", error=str(error))  # fmt: skip
            for key, futures in batch.items():
                self._read_soon({key: futures})
            return
        for key, futures in batch.items():
            for future in futures:
                if future.done():
                    continue
                if reading.error is not None:
                    future.set_exception(reading.error)
                else:
                    future.set_result(reading.found.get(key, (None, 0)))

    async def lookup(self, provider: str, message_key: str) -> MessageState | None:
        """The state of a message: the mirror's, else the bucket's; None when there is none, or
        when the bucket cannot be read in time (`find` tells the two apart)."""
        return (await self.find(provider, message_key))[1]

    async def find(
        self, provider: str, message_key: str, counted: bool = True
    ) -> tuple[bool, MessageState | None]:
        """(True, the state of a message, or None when it has none): the mirror's, else the
        bucket's. (False, None) when the mirror does not hold it and the bucket cannot be read
        in time (NATS away or stalled, the reads' connection down): the caller goes on without
        it (a callback's event goes to the spool, whose drainer gives it the state's tracking
        data once it can be read). A read that failed while NATS was connected is counted and
        logged (once until a read succeeds), unless not `counted` (the drainer's tries). A state
        held when the bucket lost it and not written back yet is found all the same."""
        held = self.mirror.get(provider, message_key)
        lost = self._lost_state(provider, message_key) if self._lost else None
        if held is not None:
            return True, held if lost is None else restore(held, lost)
        if not self._reads.is_connected:
            return (True, lost) if lost is not None else (False, None)
        try:
            state, _ = await self.read(kv_key(provider, message_key), LOOKUP_TIMEOUT)
        except (TimeoutError, nats.errors.Error) as exc:
            if lost is not None:
                return True, lost
            if not counted:
                return False, None
            self._on_read_failed()
            if not self._reads_failing:
                self._reads_failing = True
                reason = str(exc) or type(exc).__name__
                log.warning("state bucket not read in time; going on without the state",
                            error=reason, timeout_s=LOOKUP_TIMEOUT)  # fmt: skip
            return False, None
        if counted:
            self._reads_failing = False
        if lost is not None:  # not written back yet: as the write-back will leave it
            return True, restore(state, lost)
        return True, state

    async def lookup_many(
        self, provider: str, message_keys: list[str]
    ) -> list[MessageState | None]:
        """`lookup` for many messages: the mirror's states, and the bucket's, read together (one
        batched read where the bucket takes them), for those it does not hold."""
        found = [self.mirror.get(provider, key) for key in message_keys]
        # (while a write-back lasts, `lookup` merges what the mirror holds with what it held)
        missing = [i for i, state in enumerate(found) if state is None or self._lost]
        if missing:
            read = await asyncio.gather(*(self.lookup(provider, message_keys[i]) for i in missing))
            for i, state in zip(missing, read, strict=True):
                found[i] = state
        return found

    async def with_tracking(self, events: Sequence[Event]) -> list[Event | None]:
        """The events, those spooled without their message's tracking data (its state could not
        be read when they were built: NATS away or stalled, the mirror without the message)
        given it from the state as it is now, so that an event published from the spool carries
        the `phone` and `client_ref` of a registration answered before its callback; the id and
        the fact stay the same. None for an event whose state cannot be read now either (the
        publisher waits a while for it, bus.publisher)."""
        untracked = {i: m for i, e in enumerate(events) if (m := untracked_message(e)) is not None}
        filled: list[Event | None] = list(events)
        if not untracked:
            return filled
        if not self._reads.is_connected:  # just reconnected: the reads' connection follows
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reads.connected(), READ_TIMEOUT)
        found = await asyncio.gather(
            *(self.find(events[i].provider, message, counted=False)
              for i, message in untracked.items())
        )  # fmt: skip
        for i, (readable, state) in zip(untracked, found, strict=True):
            if not readable:
                filled[i] = None
            elif state is not None and (state.phone or state.client_ref or state.traceparent):
                filled[i] = with_tracking(
                    events[i], state.phone, state.client_ref, state.traceparent
                )
        return filled

    async def recorded(self, event: Event) -> bool | None:
        """Does the bucket's state of this status event's message record its fact already?
        None when it cannot be read."""
        data = orjson.loads(event.payload)["data"]
        provider = data["provider"]
        key = kv_key(provider, message_key(provider, data["message_id"], data.get("phone")))
        try:
            state, _ = await self.read(key)
        except (TimeoutError, nats.errors.Error):
            return None
        return state is not None and state.records(event.id)

    async def update(
        self, key: str, change: Callable[[MessageState | None], MessageState]
    ) -> MessageState:
        """Change and write one key with compare-and-set; the first try starts from the mirror's
        copy (a stale copy costs one retry). Raises NATS errors; contention past CAS_ATTEMPTS is
        a nats.errors.Error too."""
        for attempt in range(CAS_ATTEMPTS):
            if attempt == 0:
                current, revision = self.mirror.entry(key)
            else:
                current, revision = await self.read(key)
            new = change(current)
            if new == current:
                return new
            try:
                revision = await self._write(key, new.to_json(), revision)
            except ReplyError as exc:
                if exc.err_code in WRONG_LAST:
                    continue  # someone else wrote it; read again
                raise
            self.mirror.observe(key, new, revision)
            return new
        raise nats.errors.Error(f"{key}: still contended after {CAS_ATTEMPTS} attempts")

    async def _write(self, key: str, value: bytes, last: int) -> int:
        """Put `value` under `key` if the key's last revision is still `last` (0: no value yet);
        the new revision. ReplyError on a conflict (WRONG_LAST) or a refusal."""
        headers = {EXPECTED_LAST: str(last)}
        future = await self._replies.request(self._subject + key, value, headers)
        expiry = asyncio.get_running_loop().call_later(READ_TIMEOUT, time_out, future)
        try:
            return ack(await future).seq
        finally:
            expiry.cancel()

    async def apply(
        self,
        changes: Sequence[tuple[str, Change]],
        at_once: int = WRITES_AT_ONCE,
        batches: Batches = "atomic",
    ) -> dict[str, BaseException]:
        """Apply changes to many keys, those to one key in the order given and written once:
        as atomic batches (`batches="atomic"`: each write's revision is known at once, so the
        mirror holds it before this returns) or fast batches ("fast": cheaper, the mirror learns
        of them from its watch) where the bucket takes them, else key by key with at most
        `at_once` writes in flight; what a batch did not store is written key by key. Returns
        the keys that could not be written, with why (NATS errors); every other key is
        written, or already was as the changes would have it."""
        by_key: dict[str, list[Change]] = {}
        for key, change in changes:
            by_key.setdefault(key, []).append(change)
        takes = {"atomic": self.atomic, "fast": self.batched, "none": False}[batches]
        if not takes or len(by_key) == 1:
            return await self._one_by_one(list(by_key.items()), at_once)
        writes = []
        for key, steps in by_key.items():
            current, revision = self.mirror.entry(key)
            new = _folded(steps)(current)
            if new != current:
                writes.append((key, steps, new, revision))
        size = ATOMIC_BATCH if batches == "atomic" else fastbatch.MAX_BATCH
        chunks = [writes[i : i + size] for i in range(0, len(writes), size)]
        write_chunk = self._write_chunk if batches == "atomic" else self._write_fast
        failed: dict[str, BaseException] = {}
        for result in await asyncio.gather(*(write_chunk(c, at_once) for c in chunks)):
            failed.update(result)
        return failed

    async def _write_fast(
        self, writes: list[tuple[str, list[Change], MessageState, int]], at_once: int
    ) -> dict[str, BaseException]:
        messages = []
        for key, _, new, revision in writes:
            value = new.to_json()
            self.mirror.expect(key, value, new)
            messages.append((self._subject + key, value, {EXPECTED_LAST: str(revision)}))
        try:
            async with self._batch_gate:
                outcome = await fastbatch.send(
                    self._conn.nc, self._replies, messages, self._commit, READ_TIMEOUT, self._nuid
                )
        except (TimeoutError, nats.errors.Error):
            outcome = fastbatch.Outcome(0)  # any of them may be stored: each write finds out
        if outcome.stored == len(writes):
            self._on_batch("stored")
            return {}
        # The one refused (another writer got to its key first, or the mirror is behind) and
        # those after it: key by key, each from the bucket's copy when the mirror's is stale.
        self._on_batch("refused")
        rest = writes[outcome.stored :]
        return await self._one_by_one([(key, steps) for key, steps, _, _ in rest], at_once)

    async def _write_chunk(
        self, writes: list[tuple[str, list[Change], MessageState, int]], at_once: int
    ) -> dict[str, BaseException]:
        try:
            async with self._atomic_gate:
                revisions = await self._write_atomic(
                    [(key, new.to_json(), revision) for key, _, new, revision in writes]
                )
        except (TimeoutError, nats.errors.Error):
            # Refused as a whole or unanswered: none, or all, of it is stored; key by key, each
            # write learns which.
            self._on_batch("refused")
            return await self._one_by_one([(key, steps) for key, steps, _, _ in writes], at_once)
        self._on_batch("stored")
        for (key, _, new, _), revision in zip(writes, revisions, strict=True):
            self.mirror.observe(key, new, revision)
        return {}

    async def _one_by_one(
        self, keys: list[tuple[str, list[Change]]], at_once: int
    ) -> dict[str, BaseException]:
        gate = asyncio.Semaphore(at_once)
        failed: dict[str, BaseException] = {}

        async def one(key: str, steps: list[Change]) -> None:
            async with gate:
                try:
                    await self.update(key, _folded(steps))
                except (TimeoutError, nats.errors.Error) as exc:
                    failed[key] = exc

        await asyncio.gather(*(one(key, steps) for key, steps in keys))
        return failed

    async def _write_atomic(self, writes: list[tuple[str, bytes, int]]) -> list[int]:
        """Put each value if its key's last revision is still the one given, all or none: the
        new revisions. ReplyError when the batch is refused (any one check failing refuses it),
        TimeoutError when its commit is not answered in time."""
        batch = self._nuid.next().decode()
        last = len(writes)
        future = None
        for seq, (key, value, revision) in enumerate(writes, start=1):
            headers = {
                "Nats-Batch-Id": batch,
                "Nats-Batch-Sequence": str(seq),
                EXPECTED_LAST: str(revision),
            }
            if seq < last:
                await self._conn.nc.publish(self._subject + key, value, headers=headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                future = await self._replies.request(self._subject + key, value, headers)
        assert future is not None
        expiry = asyncio.get_running_loop().call_later(READ_TIMEOUT, time_out, future)
        try:
            committed = await future
        finally:
            expiry.cancel()
        top = ack(committed).seq
        count = orjson.loads(committed.data).get("count")
        if count != last:
            raise ReplyError(0, 0, f"atomic batch of {last} acknowledged {count}")
        return list(range(top - last + 1, top + 1))

    def _bucket_lost(self) -> None:
        """The bucket's stream was made anew (its follower saw it): the mirror starts over
        from its first write, and what it held is written back."""
        held = self.mirror.clear()
        count = 0
        for provider, states in held.items():
            if states:
                self._lost.setdefault(provider, {}).update(states)
                count += len(states)
        if not count:
            return
        if not self._losing:
            self._lost_since = time.monotonic()
        self._losing += count
        log.warning("state bucket lost what it held (a NATS server back on an empty store, or "
                    "the bucket deleted); writing back the states this replica held",
                    states=count)  # fmt: skip
        self._lost_now.set()

    def _lost_state(self, provider: str, message_key: str) -> MessageState | None:
        blob = self._lost.get(provider, {}).get(message_key)
        return None if blob is None else packed.unpack(blob, provider, message_key)[0]

    @property
    def writing_back(self) -> int:
        """States held when the bucket lost them and not written back yet."""
        return sum(len(states) for states in self._lost.values())

    async def write_back(self, beat: Beat) -> None:
        """Write what the mirror held into a bucket that lost it, WRITE_BACK states at a time,
        each put back into what the bucket has by then (bus.messages.restore: another
        replica's write-back, a report since) with compare-and-set; what is not written is
        tried again after a back-off, the loop shown failing meanwhile."""
        backoff = Backoff(0.5, 10.0)
        failing = False  # shown failing until a turn writes what it took
        while True:
            if failing:
                beat.turn()
            else:
                beat()
            if not self._lost:
                failing = False
                self._lost_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost_now.wait(), 1.0)
                continue
            if not self._conn.is_connected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._conn.connected(), 1.0)
                continue
            chunk = list(
                itertools.islice(
                    ((provider, key, kv_key(provider, key), blob)
                     for provider, states in self._lost.items() for key, blob in states.items()),
                    WRITE_BACK,
                )
            )  # fmt: skip
            failed = await self.apply(
                [(bucket_key, functools.partial(restore, held=packed.unpack(blob, p, key)[0]))
                 for p, key, bucket_key, blob in chunk]
            )  # fmt: skip
            for provider, key, bucket_key, blob in chunk:
                states = self._lost.get(provider, {})
                if bucket_key not in failed and states.get(key) is blob:
                    del states[key]  # (a blob held again since is written in a later turn)
            self._lost = {provider: states for provider, states in self._lost.items() if states}
            if failed:
                first = next(iter(failed.values()))
                error = str(first) or type(first).__name__
                log.warning("states not written back yet; trying again", failed=len(failed),
                            left=self.writing_back, error=error)  # fmt: skip
                beat.failing(f"{len(failed)} states not written back: {error}")
                failing = True
                await asyncio.sleep(backoff.failed())
                continue
            failing = False
            backoff.succeeded()
            if not self._lost:
                log.info("states written back", states=self._losing,
                         seconds=round(time.monotonic() - self._lost_since, 2))  # fmt: skip
                self._losing = 0

    async def register(self, items: list[TrackItem], at: str) -> None:
        """Apply registrations; a NATS error passes through once every write has finished or
        failed."""
        failed = await self.apply(
            [(kv_key(i.provider, i.message_id), functools.partial(register, item=i, at=at))
             for i in items]
        )  # fmt: skip
        if failed:
            raise next(iter(failed.values()))


def _folded(steps: list[Change]) -> Change:
    """The changes to one key, one after the other."""
    if len(steps) == 1:
        return steps[0]

    def folded(state: MessageState | None) -> MessageState:
        for step in steps:
            state = step(state)
        assert state is not None
        return state

    return folded


class _Reading:
    """The replies to one batched direct get, as they arrive."""

    def __init__(self, subject_prefix: str, single: bool) -> None:
        self._prefix = subject_prefix
        self._single = single  # a get of one key has no end-of-batch status
        self.found: dict[str, tuple[MessageState | None, int]] = {}
        self.error: BaseException | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_reply(self, msg: Msg) -> None:
        if self.done.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            if status not in ("204", "404"):
                self.error = ReplyError(int(status), 0, headers.get("Description", ""))
            self.done.set_result(None)
            return
        try:
            key = headers["Nats-Subject"][len(self._prefix) :]
            self.found[key] = (_state_of(msg.data, headers), int(headers["Nats-Sequence"]))
        except (KeyError, ValueError) as exc:
            self.error = ReplyError(0, 0, f"unreadable batch reply: {type(exc).__name__}")
            self.done.set_result(None)
            return
        if self._single:
            self.done.set_result(None)

    def expire(self) -> None:
        if not self.done.done():
            self.error = TimeoutError("no answer to the read in time")
            self.done.set_result(None)


def _state_of(data: bytes, headers: dict[str, str]) -> MessageState | None:
    """A bucket value as a state: None for a delete marker or a value that does not read."""
    if wire.removes_key(headers) or not data:
        return None
    try:
        return MessageState.from_json(data)
    except (ValueError, TypeError):
        return None
