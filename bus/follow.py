"""Following a stream in order, from the last sequence processed.

A `Follower` reads one stream (a key-value bucket's stream, for the state mirror) through an
ephemeral push consumer with idle heartbeats and flow control. It remembers the last stream
sequence it applied, and there is one code path for a first start, a reconnect, a restarted
server, a gap in the deliveries and a silent consumer: drop the consumer and create a new one that
delivers from that sequence + 1. A disconnect or reconnect of the process's connection triggers it
at once, and so does a new leader for the stream (a JetStream advisory); a consumer that sends
neither messages nor heartbeats for three heartbeat periods triggers it too.

Its deliveries are read raw (bus.wire.subscribe_raw): one comes for every write to the bucket, so
one for every callback, and nats-py's handling of each (headers parsed into a dict, a `Msg`, a
turn through the subscription's queue) cost about 7 µs of the callback's 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header

from bus import wire
from bus.backoff import Backoff
from bus.connection import Connection
from bus.supervisor import Beat

log = structlog.get_logger("smsbus.follow")

HEARTBEAT = 0.5
SILENT_AFTER = 3 * HEARTBEAT
# A new stream leader on a cluster: the ephemeral consumer may have lived on a node that died.
LEADER_ELECTED = "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}"
INACTIVE_THRESHOLD = 30.0
CALL_TIMEOUT = 1.0  # a call stuck in a leader election is tried again soon, not after 5 s


def delivery(reply: bytes) -> tuple[int, int, int, int]:
    """A JetStream delivery's stream sequence, consumer sequence, time stored (unix ns) and
    pending count, read off its reply subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream
    seq>.<consumer seq>.<time>.<pending>`, or the longer form with domain and account first)
    without building nats-py's metadata (a datetime and two objects) for every message.
    ValueError for anything else."""
    tokens = reply.split(b".")
    if tokens[:2] != [b"$JS", b"ACK"]:
        raise ValueError(f"not a JetStream delivery: {reply[:60]!r}")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), int(tokens[7]), int(tokens[8])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[8]), int(tokens[9]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: {reply[:60]!r}")


def sequences(reply: bytes) -> tuple[int, int, int]:
    """`delivery` without the time: the stream sequence, consumer sequence and pending count."""
    stream_seq, consumer_seq, _, pending = delivery(reply)
    return stream_seq, consumer_seq, pending


class Follower:
    def __init__(
        self,
        conn: Connection,
        name: str,
        stream: str,
        subject: str,
        apply: Callable[[bytes, bytes, bytes, int], None],
        on_reset: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self._conn = conn
        self._stream = stream
        self._subject = subject
        self._apply = apply  # subject, payload, raw headers, stream sequence
        self._on_reset = on_reset
        self.last = 0  # stream sequence of the last message applied
        self._made: datetime | None = None  # when the stream followed was made
        self.pending = 0  # messages the server still had for us at the last delivery
        self.state = "starting"  # starting | loading | following | re-establishing
        self.loaded = asyncio.Event()  # set once the first full read has caught up
        self.establishments = 0
        self._consumer: str | None = None
        self._sub: Subscription | None = None
        self._advisories: Subscription | None = None
        self._cseq = 0
        self._activity = time.monotonic()
        self._broken = asyncio.Event()
        self._replying: set[asyncio.Task[None]] = set()

    @classmethod
    def of_bucket(
        cls,
        conn: Connection,
        name: str,
        bucket: str,
        apply: Callable[[bytes, bytes, bytes, int], None],
        on_reset: Callable[[], None] = lambda: None,
    ) -> Follower:
        """A follower of a key-value bucket: its stream, every key."""
        return cls(conn, name, f"KV_{bucket}", f"$KV.{bucket}.>", apply, on_reset)

    @property
    def behind(self) -> bool:
        return self.state != "following" or self.pending > 0

    def public(self) -> dict[str, object]:
        return {"state": self.state, "last_sequence": self.last, "pending": self.pending}

    async def run(self, beat: Beat) -> None:
        backoff = Backoff(0.05, 2.0)
        while True:
            while not self._conn.is_connected:
                self.state = "re-establishing" if self.last else self.state
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._conn.connected(), HEARTBEAT)
                beat()
            change = self._conn.change()
            try:
                await self._establish()
            except (TimeoutError, nats.errors.Error) as exc:
                self.state = "re-establishing"
                log.warning(
                    "watch not re-established yet", watch=self.name,
                    error=str(exc) or type(exc).__name__,
                )  # fmt: skip
                await self._teardown()
                await asyncio.sleep(backoff.failed())
                beat()
                continue
            backoff.succeeded()
            try:
                reason = await self._watch(change, beat)
            finally:
                await self._teardown()
            self.state = "re-establishing"
            log.info("watch re-establishing", watch=self.name, reason=reason, last=self.last)

    async def _watch(self, change: asyncio.Event, beat: Beat) -> str:
        """Wait until the consumer must be replaced; say why."""
        while True:
            waiters = [asyncio.ensure_future(e.wait()) for e in (change, self._broken)]
            try:
                await asyncio.wait(waiters, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            beat()
            if change.is_set():
                return "connection changed"
            if self._broken.is_set():
                return "missed deliveries or a new stream leader"
            if time.monotonic() - self._activity > SILENT_AFTER:
                return "no heartbeat"

    async def _establish(self) -> None:
        js = self._conn.jetstream(timeout=CALL_TIMEOUT)
        stream = await js.stream_info(self._stream)
        # A new stream under the old name: made at another time (however far its writes have
        # gone since), or short of what was applied.
        made = stream.created
        if self.last and (
            (made is not None and self._made is not None and made != self._made)
            or stream.state.last_seq < self.last
        ):
            log.warning("watched stream was recreated; reloading", watch=self.name)
            self.last = 0
            self.loaded.clear()
            self._on_reset()
        self._made = made
        self._broken.clear()
        self._cseq = 0
        self._activity = time.monotonic()
        inbox = self._conn.nc.new_inbox()
        self._sub = await wire.subscribe_raw(self._conn.nc, inbox, self._on_msg)
        self._advisories = await self._conn.nc.subscribe(
            LEADER_ELECTED.format(stream=self._stream), cb=self._on_leader
        )
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=self._subject,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=HEARTBEAT,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=INACTIVE_THRESHOLD,
        )
        if self.last:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last + 1
        else:
            config.deliver_policy = DeliverPolicy.LAST_PER_SUBJECT
        self.state = "loading" if not self.loaded.is_set() else "following"
        info = await js.add_consumer(self._stream, config)
        self._consumer = info.name
        self.establishments += 1
        if info.num_pending == 0 and self._cseq == 0:
            self.pending = 0
            self._caught_up()

    def _caught_up(self) -> None:
        self.state = "following"
        self.loaded.set()

    async def _on_leader(self, msg: Msg) -> None:
        self._broken.set()

    async def _teardown(self) -> None:
        advisories, self._advisories = self._advisories, None
        if advisories is not None:
            with contextlib.suppress(nats.errors.Error):
                await advisories.unsubscribe()
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await wire.unsubscribe_raw(self._conn.nc, sub)
        if consumer is not None and self._conn.is_connected:
            # Best effort: the server drops it after INACTIVE_THRESHOLD anyway.
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await asyncio.wait_for(self._conn.js.delete_consumer(self._stream, consumer), 1.0)

    def _on_msg(self, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        """One delivery, read raw inside the connection's read loop (bus.wire)."""
        if headers and wire.status_of(headers) is not None:
            self._on_status(reply, wire.header_fields(headers))
            return
        self._activity = time.monotonic()
        try:
            stream_seq, consumer_seq, pending = sequences(reply)
        except ValueError:
            log.warning("unexpected message on the watch", watch=self.name)
            self._broken.set()  # start again from the last one applied
            return
        if consumer_seq != self._cseq + 1:
            self._broken.set()  # a gap: start again from the last one applied
            return
        self._cseq = consumer_seq
        if stream_seq > self.last:
            try:
                self._apply(subject, data, headers, stream_seq)
            except Exception:  # a fault of ours; the next message is applied all the same
                log.exception("watched message not applied", watch=self.name, seq=stream_seq)
            self.last = stream_seq
        self.pending = pending
        if pending == 0 and not self.loaded.is_set():
            self._caught_up()
        elif pending == 0:
            self.state = "following"

    def _on_status(self, reply: bytes, headers: dict[str, str]) -> None:
        """Idle heartbeats and flow-control requests from the server."""
        self._activity = time.monotonic()
        if reply:  # a flow-control request: everything before it has been applied
            self._answer(reply.decode())
        stalled = headers.get(Header.CONSUMER_STALLED)
        if stalled:
            self._answer(stalled)
        last = headers.get(Header.LAST_CONSUMER)
        if last is not None and last.isdigit() and int(last) != self._cseq:
            self._broken.set()

    def _answer(self, subject: str) -> None:
        """An empty message to `subject`, sent from the read loop's side without waiting."""

        async def send() -> None:
            with contextlib.suppress(nats.errors.Error):
                await self._conn.nc.publish(subject)

        task = asyncio.get_running_loop().create_task(send())
        self._replying.add(task)
        task.add_done_callback(self._replying.discard)
