"""The NATS wire, where nats-py's per-message work shows on the callback's path.

Out: many messages onto the connection in one piece (the batches on the callback's path).

nats-py's `publish` validates and encodes each message's headers one by one and queues it on its
own, about 5.5 µs a message; a group commit's batch of events and its batch of state writes are
two such messages per callback. Here the HPUB commands of a whole batch are encoded at once
(0.75 µs a message) and queued as one write, with the checks `publish` makes (the connection
closed or draining, a payload over the server's limit, the reconnect buffer full). Header names
and values are ours (the fact id, content types, a trace id, revisions), checked for line breaks
like nats-py checks them. nats-py's flusher sends the write, as it sends anything published.

In: a subscription read raw (`subscribe_raw`). For each message nats-py parses its headers into a
dict, builds a `Msg`, queues it and switches to the subscription's task, about 7 µs; the state
mirror's watch brings one message for every state written, most with a single header nobody
reads. A raw subscription's function gets the subject, reply, payload and headers as the parser
read them, at once, inside the connection's read loop: it must be quick and must not block, and
an exception it raises is logged, never let into the read loop. `removes_key` and
`raw_removes_key` tell a bucket message that removes its key, for every reader of the bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription

log = structlog.get_logger("smsbus.nats")

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


Raw = Callable[[bytes, bytes, bytes, bytes], None]  # subject, reply, payload, headers ("" if none)
_STATUS_LINE = b"NATS/1.0 "


def _raw_routes(nc: NATS) -> dict[int, Raw]:
    """The raw subscriptions of a connection by sid, installing their dispatch on first use (the
    parser hands every message to `nc._process_msg`; others go on to nats-py's)."""
    routes: dict[int, Raw] | None = nc.__dict__.get("_smsbus_raw")
    if routes is not None:
        return routes
    found: dict[int, Raw] = {}
    process = nc._process_msg
    stats = nc.stats

    async def process_msg(  # nats-py's parser passes None for a message without headers
        sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        handle = found.get(sid)
        if handle is None:
            await process(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handle(subject, reply, data, headers or b"")
        except Exception:
            log.exception("raw subscriber failed", subject=subject[:80].decode(errors="replace"))

    nc._process_msg = process_msg  # type: ignore[method-assign]
    nc.__dict__["_smsbus_raw"] = found
    return found


async def subscribe_raw(nc: NATS, subject: str, handle: Raw) -> Subscription:
    """Subscribe to `subject` with `handle` reading each message raw (see the module's note).
    The subscription is nats-py's own (re-sent on reconnect, ended by `unsubscribe_raw`)."""
    routes = _raw_routes(nc)
    sub = await nc.subscribe(subject)
    routes[sub._id] = handle
    return sub


async def unsubscribe_raw(nc: NATS, sub: Subscription) -> None:
    _raw_routes(nc).pop(sub._id, None)
    await sub.unsubscribe()


def status_of(headers: bytes) -> str | None:
    """The status code of a message's headers (`NATS/1.0 100 Idle Heartbeat`: "100"), or None."""
    if not headers.startswith(_STATUS_LINE):
        return None
    code = headers[len(_STATUS_LINE) :].split(b"\r\n", 1)[0].split(b" ", 1)[0]
    return code.decode() if code.isdigit() else None


def header_fields(headers: bytes) -> dict[str, str]:
    """The fields of a message's raw headers, by name (the status line left out; a repeated name
    keeps its first value)."""
    fields: dict[str, str] = {}
    for line in headers.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name:
            key = name.decode(errors="replace").strip()
            fields.setdefault(key, value.decode(errors="replace").strip())
    return fields


# Fields marking a key-value bucket's message as removing its key: a delete or purge, or
# (nats-server 2.11+) the marker the server leaves when it removes a key itself (max age, purge).
_REMOVALS = {"KV-Operation": ("DEL", "PURGE"), "Nats-Marker-Reason": ("MaxAge", "Purge", "Remove")}
_REMOVAL_NAMES = tuple(name.encode() for name in _REMOVALS)


def removes_key(fields: Mapping[str, str]) -> bool:
    """Whether a bucket message with these header fields removes its key."""
    return any(fields.get(name) in values for name, values in _REMOVALS.items())


def raw_removes_key(headers: bytes) -> bool:
    """`removes_key` for raw headers (a put carries only the revision it expected: read no
    further)."""
    return any(name in headers for name in _REMOVAL_NAMES) and removes_key(header_fields(headers))
