"""Reading what the stream holds on a subject, once, through a consumer of our own that nobody
else sees: ephemeral, in memory, one replica, nothing acknowledged. It reads the messages held
when it starts (from a time, or the first), and the server drops the consumer once it is done."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
        opt_start_time=since,
        ack_policy=AckPolicy.NONE,
        headers_only=headers_only,
        inactive_threshold=INACTIVE,
        mem_storage=True,
        num_replicas=1,
    )
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
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
        if consumer is not None:  # else the server drops it after INACTIVE
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await js.delete_consumer(stream, consumer)
