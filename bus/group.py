"""Group commit: events published in the same event-loop turn share one JetStream round trip.

Under load many callbacks wait for their acks at once. Instead of one publish and one ack each,
the events gathered in one loop turn go out as one *fast batch* (bus.fastbatch; nats-server
2.14+, a stream with `allow_batched`), answered once when every message is stored. The batch is
committed on a subject of its own (bus.stream.commit_subject), so no subscriber of the event
subjects sees the commit. A message whose `Nats-Msg-Id` the stream already holds is skipped and
still counted, so a repeated fact costs nothing more.

While batches are in flight (at most MAX_IN_FLIGHT), new events gather for the next one, so
batches grow with the load and a lone event goes out alone, as an ordinary publish. When the
stream refuses a message of a batch, those before it are stored and the rest are published again
one event at a time (their ids make that safe); a batch not answered in time fails every event in
it, which then goes to the spool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.nuid import NUID

from bus import fastbatch
from bus.events import Event
from bus.replies import Replies

MAX_BATCH = fastbatch.MAX_BATCH
MAX_IN_FLIGHT = 8


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
        await self.submit(event)

    def submit(self, event: Event) -> asyncio.Future[None]:
        """Queue the event for the next batch (only once `enabled`): a future that settles when
        JetStream acknowledged it, or with what the attempt raised."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((event, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

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
        messages = [(event.subject, event.payload, event.headers) for event, _ in items]
        try:
            outcome = await fastbatch.send(
                self._nc, self._replies, messages, self._commit, self._timeout, self._nuid
            )
        except Exception as exc:  # no answer in time, or a lost connection: these events spool
            error = BatchTimeout() if isinstance(exc, TimeoutError) else exc
            for _, future in items:
                if not future.done():
                    future.set_exception(error)
            return
        for event, future in items[: outcome.stored]:
            self._acked(event, started)
            if not future.done():
                future.set_result(None)
        # Refused from one event on: each of those on its own (a repeat is dropped by its id).
        await asyncio.gather(*(self._settle(e, f) for e, f in items[outcome.stored :]))

    async def _settle(self, event: Event, future: asyncio.Future[None]) -> None:
        try:
            await self._single(event)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(None)
