"""Group commit: events published in the same event-loop turn share one JetStream round trip.

Under load many callbacks wait for their acks at once. Instead of one publish and one ack each,
the events gathered in one loop turn go out as one *fast batch* (nats-server 2.14+, a stream
with `allow_batched`): each message carries its batch id and sequence in its reply subject, an
empty "commit, end of batch" message closes it, and the server answers that one message with a
PubAck counting the whole batch once every message is stored. The commit goes to a subject of
its own (bus.stream.commit_subject), so no subscriber of the event subjects sees it. A message
whose `Nats-Msg-Id` the stream already holds is skipped and still counted, so a repeated fact
costs nothing more.

While batches are in flight (at most MAX_IN_FLIGHT), new events gather for the next one, so
batches grow with the load and a lone event goes out alone, as an ordinary publish. A batch that
is refused, or acknowledged with a wrong count, is published again one event at a time (their
ids make that safe); one that times out fails every event in it, which then goes to the spool.
The flow-control replies the server sends while a batch is open go to a subject nobody listens
on: only the commit's answer matters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.nuid import NUID

from bus.events import Event
from bus.replies import Replies, ReplyError

MAX_BATCH = 256
MAX_IN_FLIGHT = 8
FLOW = 500  # the acknowledgement interval we allow; our batches are shorter, so none is sent
OP_START, OP_APPEND, OP_COMMIT_EOB = 0, 1, 3


class BatchTimeout(Exception):
    """No answer to a batch's commit in time."""


Single = Callable[[Event], Awaitable[None]]
Acked = Callable[[Event, float], None]


class GroupCommit:
    def __init__(
        self,
        nc: NATS,
        replies: Replies,
        commit_subject: str,
        single: Single,
        acked: Acked,
        timeout: float,
        sized: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._sized = sized  # events per round trip, for the metrics
        self._commit = commit_subject
        self._nc = nc
        self._replies = replies
        self._single = single  # one event's publish, awaiting its ack (raises on failure)
        self._acked = acked  # metrics for an event acknowledged in a batch
        self._timeout = timeout
        self._void = f"_SMSBUS_VOID.{NUID().next().decode()}"
        self._nuid = NUID()
        self._queue: list[tuple[Event, asyncio.Future[None]]] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.enabled = False  # set once the stream is known to take fast batches

    async def publish(self, event: Event) -> None:
        """Return once JetStream acknowledged the event; raise what the attempt raised."""
        if not self.enabled:
            await self._single(event)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            items, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            self._in_flight += 1
            task = asyncio.create_task(self._send(items))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, items: list[tuple[Event, asyncio.Future[None]]]) -> None:
        self._sized(len(items))
        if len(items) == 1:
            await self._settle(*items[0])
            return
        started = time.perf_counter()
        try:
            await self._batch([event for event, _ in items])
        except ReplyError:
            # Refused as a whole: each event on its own (a repeat is dropped by its id).
            await asyncio.gather(*(self._settle(e, f) for e, f in items))
            return
        except Exception as exc:  # a timeout or a lost connection: these events spool
            for _, future in items:
                if not future.done():
                    future.set_exception(exc)
            return
        for event, future in items:
            self._acked(event, started)
            if not future.done():
                future.set_result(None)

    async def _settle(self, event: Event, future: asyncio.Future[None]) -> None:
        try:
            await self._single(event)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(None)

    async def _batch(self, events: list[Event]) -> None:
        batch = self._nuid.next().decode()
        for seq, event in enumerate(events, start=1):
            op = OP_START if seq == 1 else OP_APPEND
            reply = f"{self._void}.{batch}.{FLOW}.fail.{seq}.{op}.$FI"
            await self._nc.publish(event.subject, event.payload, reply=reply, headers=event.headers)
        commit = f"{batch}.{FLOW}.fail.{len(events) + 1}.{OP_COMMIT_EOB}.$FI"
        future = await self._replies.request(self._commit, b"", reply_tail=commit)
        try:
            committed = await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise BatchTimeout() from None
        finally:
            future.cancel()
        answer: Any = orjson.loads(committed.data) if committed.data else {}
        if not isinstance(answer, dict) or "error" in answer:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise ReplyError(
                int(error.get("code", 0)), int(error.get("err_code", 0)), str(error)[:200]
            )
        if answer.get("count") != len(events):
            raise ReplyError(0, 0, f"batch of {len(events)} acknowledged {answer.get('count')}")
