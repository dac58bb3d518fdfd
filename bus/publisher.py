"""Publishing events durably: a JetStream ack, or else a row in the local spool.

`publish` returns only once the event is durable. While the spool holds anything, or NATS is not
connected, new events go straight to the spool, behind the ones already there, so a process never
reorders its own events and an outage costs a callback one fsync instead of a full timeout.

The drainer re-publishes spooled rows oldest first with their original `Nats-Msg-Id` and deletes a
row only after JetStream acknowledged it. A publish that timed out may still have been stored; the
repeated `Nats-Msg-Id` is what keeps one copy (within the stream's duplicate window).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from bus.events import Event
from bus.metrics import Metrics
from bus.spool import Row, Spool

log = structlog.get_logger("smsbus.publisher")

DRAIN_BATCH = 256
MAX_PENDING = 4000  # nats-py's default publish_async_max_pending
MAX_BACKOFF = 5.0


class _AckTimeout(Exception):
    pass


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        # Completing the future also frees nats-py's slot for this publish.
        future.set_exception(_AckTimeout())


# What a failed publish attempt can raise: nats-py's client and JetStream errors, and our timeout.
_ATTEMPT_ERRORS = (nats.errors.Error, _AckTimeout, asyncio.TimeoutError)


class Publisher:
    def __init__(
        self, nc: NATS, js: JetStreamContext, spool: Spool, metrics: Metrics, timeout: float
    ) -> None:
        self._nc = nc
        self._js = js
        self._spool = spool
        self._metrics = metrics
        self._timeout = timeout
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._degraded = False

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    async def publish(self, event: Event) -> str:
        """Make the event durable; return "published" or "spooled", or raise PublishError."""
        if event.type == "deadletter":
            self._metrics.deadletters.labels(event.provider).inc()
        if self._spool.depth == 0 and self._nc.is_connected:
            try:
                await self._publish_acked(event, self._timeout)
            except _ATTEMPT_ERRORS as exc:
                self._metrics.publish_failures.inc()
                self._enter_degraded(exc)
            else:
                return "published"
        await self._spool.append(event)
        self._wake.set()
        return "spooled"

    def start(self) -> None:
        """Start the drainer; it publishes what an earlier run left in the spool, too."""
        self._drainer = asyncio.create_task(self._drain_forever(), name="smsbus-spool-drainer")
        self._wake.set()

    def wake(self) -> None:
        """Ask the drainer to try now (NATS reconnected)."""
        self._wake.set()

    async def stop(self, flush_timeout: float) -> None:
        """Stop the drainer after one last attempt, bounded in time, to empty the spool."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None
        if self._spool.depth and self._nc.is_connected:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), flush_timeout)
        if self._spool.depth:
            log.warning("spool kept for the next start", spool_depth=self._spool.depth)

    async def _publish_acked(self, event: Event, timeout: float) -> None:
        future, started = await self._send(event, timeout)
        handle = asyncio.get_running_loop().call_later(timeout, _expire, future)
        try:
            await future
        finally:
            handle.cancel()
        self._count_ack(event, started)

    async def _send(self, event: Event, timeout: float) -> tuple[asyncio.Future[Any], float]:
        # nats-py waits without limit for a free slot once MAX_PENDING publishes are unacked;
        # past that NATS is stalled, so fail over to the spool instead of waiting.
        if self._js.publish_async_pending() >= MAX_PENDING:
            raise _AckTimeout()
        started = time.perf_counter()
        future = await self._js.publish_async(event.subject, event.payload, headers=event.headers)
        return future, started

    def _count_ack(self, event: Event, started: float) -> None:
        self._metrics.publish_duration.observe(time.perf_counter() - started)
        counter = self._metrics.published.get((event.type, event.provider))
        if counter is not None:  # registrations on track subjects are inputs, not events
            counter.inc()

    def _enter_degraded(self, exc: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            reason = "no ack in time" if isinstance(exc, _AckTimeout) else type(exc).__name__
            log.warning("publishing to the spool", reason=reason, timeout_s=self._timeout)

    async def _drain_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        backoff = 0.1
        published = 0
        while self._spool.depth:
            if not self._nc.is_connected:
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            rows = await self._spool.head(DRAIN_BATCH)
            acked = await self._publish_batch(rows)
            await self._spool.delete(acked)
            published += len(acked)
            if len(acked) < len(rows):
                await self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            else:
                backoff = 0.1
        if published or self._degraded:
            self._degraded = False
            log.info("spool drained", published=published)

    async def _publish_batch(self, rows: list[Row]) -> list[int]:
        """Publish rows pipelined, sent in spool order; return the seqs JetStream acknowledged."""
        sent: list[tuple[Row, asyncio.Future[Any], float]] = []
        try:
            for row in rows:
                future, started = await self._send(row.event, self._timeout)
                sent.append((row, future, started))
        except _ATTEMPT_ERRORS:
            self._metrics.publish_failures.inc()  # the rest of the batch waits for the next try
        if not sent:
            return []
        loop = asyncio.get_running_loop()
        handles = [loop.call_later(self._timeout, _expire, future) for _, future, _ in sent]
        await asyncio.wait([future for _, future, _ in sent])
        for handle in handles:
            handle.cancel()
        acked = []
        for row, future, started in sent:
            exc = _AckTimeout() if future.cancelled() else future.exception()
            if exc is None:
                self._count_ack(row.event, started)
                acked.append(row.seq)
            else:
                self._metrics.publish_failures.inc()
                if not isinstance(exc, _ATTEMPT_ERRORS):
                    log.error("spooled event refused", error=str(exc), event_id=row.event.id)
        return acked

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when NATS comes back."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()
