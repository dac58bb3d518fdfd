"""Many messages onto the NATS connection in one piece: the batches on the callback's path.

nats-py's `publish` validates and encodes each message's headers one by one and queues it on its
own, about 5.5 µs a message; a group commit's batch of events and its batch of state writes are
two such messages per callback. Here the HPUB commands of a whole batch are encoded at once
(0.75 µs a message) and queued as one write, with the checks `publish` makes (the connection
closed or draining, a payload over the server's limit, the reconnect buffer full). Header names
and values are ours (the fact id, content types, a trace id, revisions), checked for line breaks
like nats-py checks them. nats-py's flusher sends the write, as it sends anything published.
"""

from __future__ import annotations

from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client as NATS

Message = tuple[str, bytes, str, dict[str, str] | None]  # subject, payload, reply, headers

_HEAD = b"NATS/1.0\r\n"


def _headers(headers: dict[str, str]) -> bytes:
    lines = [_HEAD]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or ":" in name or " " in name:
            raise nats.errors.Error(f"header {name!r} cannot be sent as it is")
        lines.append(f"{name}: {value}\r\n".encode())
    lines.append(b"\r\n")
    return b"".join(lines)


def encode(messages: Sequence[Message]) -> bytes:
    """The HPUB (or PUB) commands of `messages`, in order, as one bytes."""
    parts = []
    for subject, payload, reply, headers in messages:
        if headers:
            head = _headers(headers)
            size = len(head)
            parts.append(
                b"HPUB %s %s %d %d\r\n%s%s\r\n"
                % (subject.encode(), reply.encode(), size, size + len(payload), head, payload)
            )
        else:
            parts.append(b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(),
                                                       len(payload), payload))  # fmt: skip
    return b"".join(parts)


async def publish_many(nc: NATS, messages: Sequence[Message]) -> None:
    """Queue `messages` on the connection as one write, in order; raise what `nc.publish` would
    raise for any of them (then none is sent)."""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    if any(len(payload) > nc.max_payload for _, payload, _, _ in messages):
        raise nats.errors.MaxPayloadError
    command = encode(messages)
    if not nc.is_connected:
        limit = nc._max_pending_size
        if limit <= 0 or len(command) + nc.pending_data_size > limit:
            raise nats.errors.OutboundBufferLimitError
    nc.stats["out_msgs"] += len(messages)
    nc.stats["out_bytes"] += sum(len(payload) for _, payload, _, _ in messages)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
