"""Finding events in the stream whose publish was never answered.

A publish whose ack does not come in time (the path back from nats-server hangs, the server dies
right after storing it) goes to the spool, and the drainer publishes it again with the same
`Nats-Msg-Id`; within the stream's duplicate window JetStream drops that repeat. Once the window
has passed since the event was stored (an outage that outlasted it), it would store it again. So
before publishing such an event again the drainer looks for it here: among the messages stored on
its subject around the times it was sent, read headers only by an ephemeral consumer.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

SLACK = 10.0  # seconds either side of the sends: the server's clock against ours
MAX_SCANNED = 200_000  # messages read for one subject at most
FETCH = 1000
FETCH_WAIT = 2.0
INACTIVE = 30.0  # the server drops the consumer once it is idle this long


async def stored_ids(
    js: JetStreamContext, stream: str, subject: str, start: float, end: float
) -> set[str] | None:
    """The `Nats-Msg-Id`s of the messages stored on `subject` between `start` and `end` (unix
    times, widened by SLACK); None when there are more than MAX_SCANNED of them. NATS errors and
    TimeoutError pass through."""
    begin = datetime.fromtimestamp(start - SLACK, UTC)
    until = datetime.fromtimestamp(end + SLACK, UTC)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=begin,
        ack_policy=AckPolicy.NONE,
        headers_only=True,
        filter_subject=subject,
        inactive_threshold=INACTIVE,
        mem_storage=True,
        num_replicas=1,
    )
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    consumer = None
    try:
        info = await sub.consumer_info()
        consumer = info.name
        if info.num_pending == 0:
            return set()
        ids: set[str] = set()
        scanned = 0
        while scanned < MAX_SCANNED:
            msgs = await sub.fetch(FETCH, timeout=FETCH_WAIT)
            for msg in msgs:
                if msg.metadata.timestamp > until:
                    return ids
                ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
            scanned += len(msgs)
            if msgs[-1].metadata.num_pending == 0:
                return ids
        return None
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        if consumer is not None:  # else the server drops it after INACTIVE
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await js.delete_consumer(stream, consumer)
