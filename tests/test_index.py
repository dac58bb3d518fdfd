"""The state mirror holds what its readers need, so memory follows open messages, not history."""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import timedelta
from pathlib import Path

import pytest

from bus.config import load_settings
from bus.core import Bus, open_bus
from bus.events import status_event, utcnow
from bus.follow import sequences
from bus.index import MessageIndex
from bus.messages import MessageState, TrackItem, kv_key
from bus.state import read_state
from tests.support import NatsServer, await_for, isolated_env

_ids = itertools.count(random.randrange(10**9, 10**10))
# A put's headers as nats-server stores them with a compare-and-set write.
PUT_HEADERS = b"NATS/1.0\r\nNats-Expected-Last-Subject-Sequence: 4\r\n\r\n"


async def stored(runtime: Bus, key: str, check: object = None) -> MessageState:
    """Wait (on the bucket, not a clock) until `key` is written."""
    kv = runtime.states.kv

    async def written() -> MessageState | None:
        state, _ = await read_state(kv, key)
        return state if state is not None and check in (None, state.status) else None

    return await await_for(written, what=f"{key} projected")


async def mirrored(runtime: Bus, provider: str, message_id: str, status: str) -> None:
    index = runtime.states.mirror

    async def held() -> bool:
        state = index.get(provider, message_id)
        return state is not None and state.status == status

    await await_for(held, what=f"{provider} {message_id} in the mirror as {status}")


async def let_go(runtime: Bus, provider: str, message_id: str) -> None:
    index = runtime.states.mirror

    async def gone() -> bool:
        return index.get(provider, message_id) is None

    await await_for(gone, what=f"{provider} {message_id} let go by the mirror")


def tracked_gauge(runtime: Bus, provider: str) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "smsbus_tracked_messages", {"provider": provider}
    )
    assert value is not None
    return value


def test_mirror_lets_go_of_what_no_reader_needs(nats_server: NatsServer, tmp_path: Path) -> None:
    async def scenario() -> None:
        env = isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path))
        async with open_bus(load_settings(env)) as runtime:
            index, prefix = runtime.states.mirror, runtime.settings.subject_prefix
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

    asyncio.run(scenario())


def test_a_deliverys_sequences_are_read_off_its_reply_subject() -> None:
    # The short form, and the long one with a domain, an account hash and a random token.
    assert (1042, 17, 5) == sequences(b"$JS.ACK.KV_x_messages.c1.1.1042.17.1795341600000000000.5")
    long = b"$JS.ACK.hub.ACCHASH.KV_x_messages.c1.2.1042.17.1795341600000000000.0.rnd"
    assert (1042, 17, 0) == sequences(long)
    for junk in (b"_INBOX.abc.def", b"$JS.ACK.short.1.2", b"$JS.ACK.a.b.c.x.y.z.w"):
        with pytest.raises(ValueError):
            sequences(junk)


def test_own_writes_of_unknown_revision_are_held_from_their_bytes_and_others_decoded() -> None:
    """A fast batch's writes (bus.state) are expected by their bytes: the watch delivering those
    bytes holds the written state; any other bytes under the key are decoded, as always."""
    index = MessageIndex("b")
    told: list[MessageState] = []
    index.listeners.append(told.append)
    message_id = str(next(_ids))
    key = kv_key("smstower", message_id)
    ours = MessageState("smstower", message_id, tracked=True, status="sent", phone="79030001122")
    theirs = MessageState("smstower", message_id, tracked=True, status="sent", phone="79035556677")

    def delivered(state: MessageState) -> tuple[bytes, bytes, bytes]:
        return f"$KV.b.{key}".encode(), state.to_json(), PUT_HEADERS

    index.expect(key, ours.to_json(), ours)
    index.apply(*delivered(theirs), 5)  # another writer's, at the revision ours expected
    assert theirs == index.get("smstower", message_id)
    index.apply(*delivered(ours), 6)  # ours, once the other's is decoded: still held
    assert ours == index.get("smstower", message_id)
    assert (ours, 6) == index.entry(key)
    assert [theirs, ours] == told

    index.expect(key, ours.to_json(), ours)
    index.clear()  # the stream recreated: what was expected is forgotten with the rest
    index.apply(*delivered(theirs), 1)
    assert theirs == index.get("smstower", message_id)


def test_a_key_deleted_purged_or_removed_by_the_server_is_let_go() -> None:
    """The watch's deliveries are read raw (bus.wire): a delete or purge marker, or a marker the
    server leaves when it removes a key itself (max age), lets the state go; a put's header (the
    revision it expected) does not, nor does a header that only looks like a marker."""
    index = MessageIndex("b")
    message_id = str(next(_ids))
    subject = f"$KV.b.{kv_key('smstower', message_id)}".encode()
    state = MessageState("smstower", message_id, tracked=True, status="sent").to_json()
    markers = [
        b"NATS/1.0\r\nKV-Operation: DEL\r\n\r\n",
        b"NATS/1.0\r\nKV-Operation: PURGE\r\nNats-Rollup: sub\r\n\r\n",
        b"NATS/1.0\r\nNats-Marker-Reason: MaxAge\r\nNats-TTL: 1s\r\n\r\n",
    ]
    revision = 0
    for marker in markers:
        for headers in (PUT_HEADERS, b"NATS/1.0\r\nX-Note: KV-Operation: DEL\r\n\r\n", b""):
            revision += 1
            index.apply(subject, state, headers, revision)
            assert index.is_open("smstower", message_id), headers
        revision += 1
        index.apply(subject, state, marker, revision)  # read off the headers, payload or not
        assert index.get("smstower", message_id) is None, marker
