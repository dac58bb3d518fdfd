"""The follower (bus.follow) reads its stream raw (bus.wire): every message applied once, in order,
however fast the stream was filled, with the server's flow-control requests answered (a consumer
left waiting for its answer stops delivering)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from nats.js.api import StreamConfig

from bus import wire
from bus.config import load_settings
from bus.connection import Connection
from bus.follow import Follower
from tests.support import NatsServer, await_for, isolated_env

MESSAGES = 150_000  # enough for nats-server to ask for flow control several times


async def _filled(conn: Connection, count: int) -> str:
    stream = f"F{uuid.uuid4().hex[:10]}"
    await conn.js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
    messages = [(f"{stream}.{i}", b"%d" % i + b"." * 200, "", None) for i in range(count)]
    for at in range(0, len(messages), 2000):
        await wire.publish_many(conn.nc, messages[at : at + 2000])
    await conn.nc.flush()
    return stream


def test_a_large_stream_is_followed_whole_in_order_with_flow_control_answered(
    nats_server: NatsServer,
) -> None:
    async def main() -> None:
        conn = Connection(load_settings(isolated_env(nats_server.url)))
        await conn.open(time.monotonic() + 10)
        applied: list[tuple[bytes, int]] = []
        answered: list[bytes] = []
        try:
            stream = await _filled(conn, MESSAGES)

            def apply(subject: bytes, data: bytes, headers: bytes, seq: int) -> None:
                applied.append((data.split(b".", 1)[0], seq))

            follower = Follower(conn, "test", stream, f"{stream}.>", apply)
            on_status = follower._on_status

            def counted(reply: bytes, headers: dict[str, str]) -> None:
                if reply:
                    answered.append(reply)
                on_status(reply, headers)

            follower._on_status = counted  # type: ignore[method-assign]
            task = asyncio.create_task(follower.run(lambda: None))

            async def loaded() -> bool:
                return follower.loaded.is_set() and len(applied) == MESSAGES

            await await_for(loaded, timeout=60, what="the stream applied")
            assert [(b"%d" % i, i + 1) for i in range(MESSAGES)] == applied
            assert answered, "the server asked for no flow control; fill the stream with more"
            assert (follower.last, follower.establishments) == (MESSAGES, 1)

            # More after the first read: applied as they come, by the same consumer.
            more = [(f"{stream}.x", b"%d." % i, "", None) for i in range(MESSAGES, MESSAGES + 10)]
            await wire.publish_many(conn.nc, more)

            async def followed() -> bool:
                return follower.last == MESSAGES + 10

            await await_for(followed, what="the new messages")
            assert 1 == follower.establishments
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await conn.close()

    asyncio.run(main())
