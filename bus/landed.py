"""Finding events in the stream whose publish was never answered.

A publish whose ack does not come in time (the path back from nats-server hangs, the server dies
right after storing it) goes to the spool, and the drainer publishes it again with the same
`Nats-Msg-Id`; within the stream's duplicate window JetStream drops that repeat. Once the window
has passed since the event was stored (an outage that outlasted it), it would store it again. So
before publishing such an event again the drainer looks for it here: among the messages stored on
its subject around the times it was sent, read headers only (bus.scan).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from nats.js.client import JetStreamContext

from bus import scan

SLACK = 10.0  # seconds either side of the sends: the server's clock against ours
MAX_SCANNED = 200_000  # messages read for one subject at most
FETCH = 1000


async def stored_ids(
    js: JetStreamContext, stream: str, subject: str, start: float, end: float
) -> set[str] | None:
    """The `Nats-Msg-Id`s of the messages stored on `subject` between `start` and `end` (unix
    times, widened by SLACK); None when there are more than MAX_SCANNED of them. NATS errors and
    TimeoutError pass through."""
    since = datetime.fromtimestamp(start - SLACK, UTC)
    until = datetime.fromtimestamp(end + SLACK, UTC)
    ids: set[str] = set()
    scanned = 0
    messages = scan.held(js, stream, subject, since, headers_only=True, batch=FETCH)
    async with contextlib.aclosing(messages):
        async for msg in messages:
            if msg.metadata.timestamp > until:
                break
            if scanned == MAX_SCANNED:
                return None
            scanned += 1
            ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
    return ids
