"""Finding events in the stream whose publish was never answered.

A publish whose ack does not come in time (the path back from nats-server hangs, the server dies
right after storing it) goes to the spool, and the drainer publishes it again with the same
`Nats-Msg-Id`; within the stream's duplicate window JetStream drops that repeat. Once the window
has passed since the event was stored (an outage that outlasted it), it would store it again. So
before publishing such an event again the drainer looks for it here: among the messages stored on
its subject around the times it was sent, read headers only (bus.scan).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from bus import scan

SLACK = 10.0  # seconds either side of the sends: the server's clock against ours
# Messages read for one subject at most: 17 minutes of 5,000 events a second, read in about
# 50 s on a 2-core machine (README "Beyond the window"); only the ids looked for are kept.
MAX_SCANNED = 5_000_000
FETCH = 1000


async def stored_ids(
    nc: NATS,
    js: JetStreamContext,
    stream: str,
    subject: str,
    start: float,
    end: float,
    wanted: Collection[str],
) -> set[str] | None:
    """Which of the `Nats-Msg-Id`s `wanted` are stored on `subject` between `start` and `end`
    (unix times, widened by SLACK); None when more than MAX_SCANNED messages lie between them.
    NATS errors and TimeoutError pass through."""
    since = datetime.fromtimestamp(start - SLACK, UTC)
    until = datetime.fromtimestamp(end + SLACK, UTC)
    return await scan.find_ids(nc, js, stream, subject, since, until, wanted, MAX_SCANNED, FETCH)
