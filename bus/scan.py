"""Reading what the stream holds on a subject, once, through a consumer of our own that nobody
else sees: ephemeral, in memory, one replica, nothing acknowledged. `held` reads the messages held
when it starts (from a time, or the first); `find_ids` looks for ids between two times, reading
headers raw. The server drops the consumer once it is done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Collection
from datetime import datetime
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from bus import wire
from bus.follow import delivery

INACTIVE = 30.0  # the server drops a consumer left behind once it is idle this long
FETCH_WAIT = 2.0


async def held(
    js: Any,
    stream: str,
    subject: str,
    since: datetime | None = None,
    headers_only: bool = False,
    batch: int = 256,
) -> AsyncGenerator[Msg, None]:
    """The messages on `subject` (a filter) from `since` (else the first) to the last one
    held when this starts, oldest first. TimeoutError when a fetch is not answered in time
    (the messages were purged meanwhile, or NATS is stalled); NATS errors pass through. Close
    it (`contextlib.aclosing`) when leaving it early."""
    sub = await js.pull_subscribe(subject, stream=stream, config=_reader(since, headers_only))
    consumer = None
    try:
        info = await sub.consumer_info()
        consumer, left = info.name, info.num_pending
        while left > 0:
            for msg in await sub.fetch(min(batch, left), timeout=FETCH_WAIT):
                left = msg.metadata.num_pending
                yield msg
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        await _delete(js, stream, consumer)


async def first_since(js: Any, stream: str, subject: str, since: datetime) -> int:
    """The stream sequence of the first message stored at or after `since` (the next one to be
    stored, when none is): where a reader that must start by sequence starts. nats-py's ordered
    consumer starts again by sequence after a gap or a reconnection, keeping the start time it
    was made with, which the server refuses beside a start sequence."""
    sub = await js.pull_subscribe(subject, stream=stream, config=_reader(since, True))
    consumer = None
    try:
        info = await sub.consumer_info()
        consumer = info.name
        return int(info.delivered.stream_seq) + 1  # the server sets it to the start, less one
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        await _delete(js, stream, consumer)


def _reader(since: datetime | None, headers_only: bool) -> ConsumerConfig:
    """A consumer of our own that nobody else sees, from `since` (else the first message)."""
    return ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
        opt_start_time=since,
        ack_policy=AckPolicy.NONE,
        headers_only=headers_only,
        inactive_threshold=INACTIVE,
        mem_storage=True,
        num_replicas=1,
    )


async def _delete(js: Any, stream: str, consumer: str | None) -> None:
    if consumer is not None:  # else the server drops it after INACTIVE
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await js.delete_consumer(stream, consumer)


_MSG_ID = b"\r\nNats-Msg-Id:"


def _msg_id(headers: bytes) -> str:
    """The `Nats-Msg-Id` of a message's raw headers, as smsbus sends it ("" when there is none)."""
    start = headers.find(_MSG_ID)
    if start < 0:
        return ""
    start += len(_MSG_ID)
    return headers[start : headers.find(b"\r\n", start)].strip().decode(errors="replace")


class _Search:
    """The deliveries of one search, read raw in the connection's read loop (bus.wire)."""

    def __init__(self, wanted: set[str], until_ns: int, limit: int) -> None:
        self.wanted = wanted
        self.found: set[str] = set()
        self.until_ns = until_ns
        self.limit = limit
        self.scanned = 0
        self.pending = 0  # what the consumer still has for us, as of its last delivery
        self.over = False  # more than `limit` messages in the range
        self.ended = False
        self.error: str | None = None
        self._asked = 0
        self._got = 0
        self.batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ask(self, count: int) -> None:
        self._asked, self._got = count, 0
        self.batch = asyncio.get_running_loop().create_future()

    def _wake(self) -> None:
        if not self.batch.done():
            self.batch.set_result(None)

    def on_msg(self, subject: bytes, reply: bytes, payload: bytes, headers: bytes) -> None:
        if not reply.startswith(b"$JS.ACK."):  # a status: the request expired, or went wrong
            status = wire.status_of(headers)
            if status not in ("404", "408"):
                self.error = f"pull request answered {status or 'without a status'}"
            elif self._got == 0:  # nothing more to deliver (what was pending was removed)
                self.ended = True
            self._wake()
            return
        try:
            _, _, stamp, self.pending = delivery(reply)
        except ValueError as exc:
            self.error = str(exc)
            self._wake()
            return
        if stamp > self.until_ns:
            self.ended = True
        elif self.scanned == self.limit:
            self.over = self.ended = True
        else:
            self.scanned += 1
            msg_id = _msg_id(headers)
            if msg_id in self.wanted:
                self.found.add(msg_id)
                self.ended = len(self.found) == len(self.wanted)
        self._got += 1
        self.ended = self.ended or self.pending == 0
        if self.ended or self._got == self._asked:
            self._wake()


async def find_ids(
    nc: NATS,
    js: JetStreamContext,
    stream: str,
    subject: str,
    since: datetime,
    until: datetime,
    wanted: Collection[str],
    limit: int,
    batch: int = 1000,
) -> set[str] | None:
    """Which of the `Nats-Msg-Id`s `wanted` the stream holds on `subject` (a filter) among the
    messages stored from `since` to `until` (the server's clock), oldest first. The messages are
    read headers only and raw (bus.wire), without the per-message work of `held` (nats-py's
    fetch reads about 14,000 a second); the search ends as soon as every id is found. None when
    more than `limit` messages would have to be read. TimeoutError when a batch is not answered
    in time; NATS errors pass through."""
    search = _Search(set(wanted), int(until.timestamp() * 1e9), limit)
    if not search.wanted:
        return set()
    config = _reader(since, headers_only=True)
    config.filter_subject = subject
    inbox = nc.new_inbox()
    sub = await wire.subscribe_raw(nc, inbox, search.on_msg)
    consumer = None
    try:
        info = await js.add_consumer(stream, config)
        consumer = info.name
        search.pending = info.num_pending or 0
        request_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        expires = int(FETCH_WAIT * 1e9)
        while search.pending > 0 and not search.ended:
            count = min(batch, search.pending)
            search.ask(count)
            request = orjson.dumps({"batch": count, "expires": expires})
            await nc.publish(request_subject, request, reply=inbox)
            await asyncio.wait_for(search.batch, FETCH_WAIT + 1.0)
            if search.error is not None:
                raise nats.errors.Error(search.error)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await wire.unsubscribe_raw(nc, sub)
        await _delete(js, stream, consumer)
    return None if search.over else search.found
