"""Fast batches as a single nats-server and a 3-node cluster answer them (bus.fastbatch): a batch
stored whole is answered with its count, a message refused ends the batch with those before it
stored and says so, and a clustered stream, which answers on other subjects than a single server,
is read as well. Also the batch's wire form (bus.wire): what nats-server receives is what nats-py's
`publish` would have sent; and subscriptions read raw."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.nuid import NUID

from bus import fastbatch, wire
from bus.replies import WRONG_LAST, Replies, stored
from tests.support import NatsCluster, NatsServer, await_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path_factory.mktemp("cluster")).start()
    yield nodes
    nodes.stop()


@pytest.fixture(params=["single", "cluster"])
def urls(request: pytest.FixtureRequest, nats_server: NatsServer) -> list[str]:
    if request.param == "single":
        return [nats_server.url]
    return list(request.getfixturevalue("cluster").urls)


def run(urls: list[str], check: Callable[..., Awaitable[None]]) -> None:
    """`check(nc, kv, replies, bucket)` on a fresh bucket that takes fast batches (R3 on the
    cluster)."""

    async def main() -> None:
        replicas = 3 if len(urls) > 1 else 1
        nc = await nats.connect(urls)
        js = nc.jetstream()
        name = f"B{uuid.uuid4().hex[:8]}"
        kv = await js.create_key_value(
            KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE, replicas=replicas)
        )
        info = await js.stream_info(f"KV_{name}")
        await js.update_stream(dataclasses.replace(info.config, allow_batched=True))
        replies = Replies(nc)
        await replies.start()
        try:
            await check(nc, kv, replies, name)
        finally:
            await replies.stop()
            await js.delete_key_value(name)
            await nc.close()

    asyncio.run(main())


def writes(name: str, keys: list[str], expected: list[int]) -> list[fastbatch.Message]:
    header = "Nats-Expected-Last-Subject-Sequence"
    return [
        (f"$KV.{name}.{key}", key.encode(), {header: str(revision)})
        for key, revision in zip(keys, expected, strict=True)
    ]


async def send(nc: Any, replies: Replies, name: str, messages: list[fastbatch.Message]) -> Any:
    commit = f"$KV.{name}._commit"
    return await fastbatch.send(nc, replies, messages, commit, 5.0, NUID())


async def values(kv: Any, keys: list[str]) -> dict[str, bytes]:
    found = {}
    for key in keys:
        try:
            found[key] = (await kv.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            pass
    return found


def test_a_batch_stored_whole_is_answered_with_its_count(urls: list[str]) -> None:
    keys = [f"k{i}" for i in range(40)]

    async def check(nc: Any, kv: Any, replies: Replies, name: str) -> None:
        outcome = await send(nc, replies, name, writes(name, keys, [0] * len(keys)))
        assert fastbatch.Outcome(len(keys)) == outcome
        assert {key: key.encode() for key in keys} == await values(kv, keys)

    run(urls, check)


def test_a_refused_write_ends_the_batch_and_those_before_it_are_stored(urls: list[str]) -> None:
    keys = ["a", "b", "c", "d"]

    async def check(nc: Any, kv: Any, replies: Replies, name: str) -> None:
        taken = await kv.put("c", b"someone else's")
        outcome = await send(nc, replies, name, writes(name, keys, [0, 0, 0, 0]))
        assert 2 == outcome.stored
        assert outcome.error is not None and outcome.error.err_code in WRONG_LAST
        found = await values(kv, keys)
        assert {"a": b"a", "b": b"b", "c": b"someone else's"} == found  # "d" never tried
        # The refused write, at the right revision, and the rest: a batch of their own.
        outcome = await send(nc, replies, name, writes(name, ["c", "d"], [taken, 0]))
        assert fastbatch.Outcome(2) == outcome
        assert {"c": b"c", "d": b"d"} == await values(kv, ["c", "d"])

    run(urls, check)


def test_a_first_write_refused_stores_nothing(urls: list[str]) -> None:
    keys = ["a", "b"]

    async def check(nc: Any, kv: Any, replies: Replies, name: str) -> None:
        await kv.put("a", b"old")
        outcome = await send(nc, replies, name, writes(name, keys, [0, 0]))
        assert 0 == outcome.stored
        assert outcome.error is not None and outcome.error.err_code in WRONG_LAST
        assert {"a": b"old"} == await values(kv, keys)

    run(urls, check)


def test_batches_written_on_the_wire_are_what_publish_sends(nats_server: NatsServer) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            subject = f"wire.{uuid.uuid4().hex}"
            got: list[tuple[str, str, dict[str, str] | None, bytes]] = []
            done = asyncio.Event()

            async def seen(msg: Any) -> None:
                got.append((msg.subject, msg.reply, msg.headers, msg.data))
                if len(got) == 6:
                    done.set()

            await nc.subscribe(f"{subject}.>", cb=seen)
            messages: list[wire.Message] = [
                (f"{subject}.a", b"with headers", "reply.1", {"Nats-Msg-Id": "x1", "A": "b c"}),
                (f"{subject}.b", b"", "", None),
                (f"{subject}.c", "текст".encode(), "reply.3", None),
            ]
            await wire.publish_many(nc, messages)
            for subj, payload, reply, headers in messages:
                await nc.publish(subj, payload, reply=reply, headers=headers)
            await asyncio.wait_for(done.wait(), 5)
            assert got[:3] == got[3:]
            assert (f"{subject}.a", "reply.1", {"Nats-Msg-Id": "x1", "A": "b c"}) == got[0][:3]
            with pytest.raises(nats.errors.Error):
                await wire.publish_many(nc, [(f"{subject}.d", b"", "", {"A": "line\r\nbreak"})])
            too_big = b"x" * (nc.max_payload + 1)
            with pytest.raises(nats.errors.MaxPayloadError):
                await wire.publish_many(nc, [(f"{subject}.e", b"ok", "", None),
                                             (f"{subject}.f", too_big, "", None)])  # fmt: skip
            await nc.flush()
            assert 6 == len(got)  # neither refused batch sent anything
        finally:
            await nc.close()

    asyncio.run(main())


def test_a_group_commit_on_a_clustered_stream_is_answered(cluster: NatsCluster) -> None:
    """Events batched on an R3 stream are acknowledged (a cluster answers on the last message's
    subject, not the commit's) rather than timing out into the spool."""

    async def main() -> None:
        nc = await nats.connect(cluster.urls)
        js = nc.jetstream()
        name = f"S{uuid.uuid4().hex[:8]}"
        await js.add_stream(
            StreamConfig(name=name, subjects=[f"{name}.>"], num_replicas=3, allow_batched=True,
                         storage=StorageType.FILE)
        )  # fmt: skip
        replies = Replies(nc)
        await replies.start()
        try:
            nuid = NUID()
            events = [
                (f"{name}.e", f"event {i}".encode(), {"Nats-Msg-Id": f"{name}-{i}"})
                for i in range(30)
            ]
            outcome = await fastbatch.send(nc, replies, events, f"{name}.commit", 5.0, nuid)
            assert fastbatch.Outcome(30) == outcome
            again = await fastbatch.send(nc, replies, events, f"{name}.commit", 5.0, nuid)
            assert fastbatch.Outcome(30) == again  # repeats are skipped and still counted
            assert 30 == (await js.stream_info(name)).state.messages
        finally:
            await replies.stop()
            await js.delete_stream(name)
            await nc.close()

    asyncio.run(main())


def test_a_raw_subscription_reads_messages_as_sent_and_survives_its_own_faults(
    nats_server: NatsServer,
) -> None:
    """bus.wire.subscribe_raw: subject, reply, payload and raw headers as sent, in order; a
    handler that raises loses that one message, not the connection nor the messages after it nor
    other subscriptions; after unsubscribe_raw nothing more comes."""

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            subject = f"raw.{uuid.uuid4().hex}"
            got: list[tuple[bytes, bytes, bytes, bytes]] = []
            plain: list[bytes] = []

            def seen(subj: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
                if data == b"boom":
                    raise RuntimeError("a fault of the handler")
                got.append((subj, reply, data, headers))

            async def other(msg: Any) -> None:
                plain.append(msg.data)

            sub = await wire.subscribe_raw(nc, f"{subject}.>", seen)
            await nc.subscribe(f"{subject}-plain", cb=other)
            await nc.publish(f"{subject}.a", b"one", reply="r.1", headers={"K": "v", "N": "2"})
            await nc.publish(f"{subject}.b", b"boom")
            await nc.publish(f"{subject}-plain", b"still read")
            await nc.publish(f"{subject}.c", "два".encode())
            await nc.publish(f"{subject}-plain", b"after them")

            async def arrived() -> bool:
                return len(plain) == 2  # sent after the others, to the same connection

            await await_for(arrived, what="the messages")
            assert [
                (f"{subject}.a".encode(), b"r.1", b"one", b"NATS/1.0\r\nK: v\r\nN: 2\r\n\r\n"),
                (f"{subject}.c".encode(), b"", "два".encode(), b""),
            ] == got
            assert {"K": "v", "N": "2"} == wire.header_fields(got[0][3])
            assert wire.status_of(got[0][3]) is None
            assert nc.is_connected

            await wire.unsubscribe_raw(nc, sub)
            await nc.publish(f"{subject}.d", b"after")
            await nc.publish(f"{subject}-plain", b"marker")

            async def marked() -> bool:
                return len(plain) == 3

            await await_for(marked, what="the marker")
            assert 2 == len(got) and [b"still read", b"after them", b"marker"] == plain
        finally:
            await nc.close()

    asyncio.run(main())


def test_status_lines_and_fields_of_raw_headers() -> None:
    beat = (
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\nNats-Last-Stream: 1024\r\n\r\n"
    )
    assert "100" == wire.status_of(beat)
    assert {"Nats-Last-Consumer": "1016", "Nats-Last-Stream": "1024"} == wire.header_fields(beat)
    assert "100" == wire.status_of(b"NATS/1.0 100 FlowControl Request\r\n\r\n")
    assert "404" == wire.status_of(b"NATS/1.0 404\r\n\r\n")
    assert wire.status_of(b"NATS/1.0\r\nA: b\r\n\r\n") is None
    assert wire.status_of(b"") is None
    assert {"A": "b: c", "D": ""} == wire.header_fields(b"NATS/1.0\r\nA: b: c\r\nD:\r\nE\r\n\r\n")
    removals = [{"KV-Operation": "DEL"}, {"KV-Operation": "PURGE"}]
    removals += [{"Nats-Marker-Reason": "MaxAge"}, {"Nats-Marker-Reason": "Remove"}]
    for removal in removals:
        assert wire.removes_key(removal), removal
    for kept in ({}, {"KV-Operation": "PUT"}, {"Nats-Expected-Last-Subject-Sequence": "4"}):
        assert not wire.removes_key(kept), kept


def test_a_deleted_or_purged_key_reads_as_no_value_at_its_markers_sequence(
    nats_server: NatsServer,
) -> None:
    """bus.replies.stored on the stream leader's copy of a key (`STREAM.MSG.GET`): a value as it
    is, a delete or purge marker as no value at the marker's sequence (a write after it names
    that sequence), a key never written as None."""

    async def main() -> None:
        nc = await nats.connect(nats_server.url)
        replies = Replies(nc)
        await replies.start()
        try:
            name = f"B{uuid.uuid4().hex[:8]}"
            kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=name, history=5))

            async def read(key: str) -> tuple[bytes, int] | None:
                request = orjson.dumps({"last_by_subj": f"$KV.{name}.{key}"})
                future = await replies.request(f"$JS.API.STREAM.MSG.GET.KV_{name}", request)
                return stored(await asyncio.wait_for(future, 5))

            put = await kv.put("a", b"value")
            assert (b"value", put) == await read("a")
            await kv.delete("a")
            assert (b"", put + 1) == await read("a")
            await kv.put("b", b"value")
            await kv.purge("b")
            assert (b"", put + 3) == await read("b")
            assert await read("never") is None
        finally:
            await replies.stop()
            await nc.close()

    asyncio.run(main())
