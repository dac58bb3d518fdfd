"""The state mirror holds what its readers need, so memory follows open messages, not history."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import timedelta
from pathlib import Path

from bus.config import load_settings
from bus.events import status_event, utcnow
from bus.messages import MessageState, TrackItem, kv_key
from bus.projector import read_state
from bus.runtime import Runtime
from tests.support import NatsServer, isolated_env

_ids = itertools.count(random.randrange(10**9, 10**10))


async def stored(runtime: Runtime, key: str, check: object = None) -> MessageState:
    """Wait (on the bucket, not a clock) until the projector has written `key`."""
    assert runtime.messages is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state, _ = await read_state(runtime.messages, key)
        if state is not None and (check is None or state.status == check):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"{key} was not projected")


async def mirrored(runtime: Runtime, provider: str, message_id: str, status: str) -> None:
    assert runtime.index is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = runtime.index.get(provider, message_id)
        if state is not None and state.status == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{provider} {message_id} never reached the mirror as {status}")


async def let_go(runtime: Runtime, provider: str, message_id: str) -> None:
    assert runtime.index is not None
    deadline = time.monotonic() + 10
    while runtime.index.get(provider, message_id) is not None:
        assert time.monotonic() < deadline, f"{provider} {message_id} is still in the mirror"
        await asyncio.sleep(0.02)


def tracked_gauge(runtime: Runtime, provider: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "smsbus_tracked_messages", {"provider": provider}
    )
    assert value is not None
    return value


def test_mirror_lets_go_of_what_no_reader_needs(nats_server: NatsServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        env = isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path))
        runtime = Runtime(load_settings(env))
        await runtime.start()
        try:
            index, prefix = runtime.index, runtime.settings.subject_prefix
            assert index is not None
            untracked, tracked, pending, smsc = (str(next(_ids)) for _ in range(4))
            await runtime.publisher.publish(
                TrackItem("smspilot", tracked, client_ref="order-1").event(prefix)
            )
            await mirrored(runtime, "smspilot", tracked, None)  # type: ignore[arg-type]
            assert 1 == tracked_gauge(runtime, "smspilot")
            for provider, message_id, raw in [
                ("smspilot", untracked, "2"),  # final, and no poll repeats it: let go
                ("smspilot", pending, "1"),  # not final: held until it is
                ("smspilot", tracked, "2"),  # final: let go, tracked or not
                ("smsc", smsc, "1"),  # final, but SMSC's history repeats it: held
            ]:
                event = status_event(prefix, provider, message_id, raw, via="callback",
                                     received_at=utcnow())  # fmt: skip
                await runtime.publisher.publish(event)
            # Each write has reached the bucket, and the mirror holds what it should.
            await stored(runtime, kv_key("smspilot", untracked), "delivered")
            await stored(runtime, kv_key("smspilot", tracked), "delivered")
            await mirrored(runtime, "smsc", smsc, "delivered")
            await mirrored(runtime, "smspilot", pending, "sent")
            await let_go(runtime, "smspilot", tracked)
            assert index.get("smspilot", untracked) is None
            assert index.entry(kv_key("smspilot", untracked)) == (None, 0)
            assert 2 == index.held
            assert 0 == tracked_gauge(runtime, "smspilot")

            # A later report about the let-go message is still applied, from a read: between two
            # final reports the later wins.
            late = status_event(prefix, "smspilot", untracked, "-1", via="callback",
                                received_at=utcnow())  # fmt: skip
            await runtime.publisher.publish(late)
            state = await stored(runtime, kv_key("smspilot", untracked), "undelivered")
            assert (True, "-1") == (state.final, state.provider_status)
            assert index.get("smspilot", untracked) is None

            # Pruning lets go of all that is not open once old enough; an open tracked one stays.
            open_one = str(next(_ids))
            await runtime.publisher.publish(TrackItem("smstower", open_one).event(prefix))
            await stored(runtime, kv_key("smstower", open_one))
            await mirrored(runtime, "smstower", open_one, None)  # type: ignore[arg-type]
            assert 0 == index.prune(retain=timedelta(days=1))
            assert 2 == index.prune(retain=timedelta(0))
            assert index.get("smstower", open_one) is not None
            assert 1 == index.held
        finally:
            await runtime.stop()

    asyncio.run(scenario())
