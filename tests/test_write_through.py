"""A status event's state is written by the replica that publishes it (bus.projection), before the
event counts as done: `OK` means the state records the fact; a state that cannot be written is
owed by the spool and written once the bucket takes it, without the event stored twice; a fast
batch of states refused part-way (the mirror was behind another writer) is finished key by key;
and a spool from an earlier release opens and drains."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus import projector
from bus.config import load_settings
from bus.connection import Connection
from bus.core import open_bus
from bus.events import status_event, utcnow
from bus.messages import MessageState, TrackItem, apply_status, kv_key, register
from bus.spool import Spool
from bus.state import States, read_state
from bus.stream import bucket_names, ensure_all
from tests.support import (
    NatsServer,
    Smsbus,
    await_for,
    callbacks_at_once,
    isolated_env,
    read_stream,
    wait_for,
)

_ids = itertools.count(random.randrange(10**9, 10**10))


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("through")).start()
    yield bus
    assert 0 == bus.stop()


def shown(client: httpx.Client, bus: Smsbus, server_id: str) -> dict[str, object] | None:
    answer = client.get(f"{bus.api}/v1/messages/smspilot/{server_id}")
    return dict(answer.json()) if answer.status_code == 200 else None


def stored_once(nats: NatsServer, bus: Smsbus, ids: list[str]) -> bool:
    found = read_stream(nats.url, bus.stream, f"{bus.prefix}.status.smspilot.>")
    counts = {i: 0 for i in ids}
    for item in found:
        if item.event["subject"] in counts:
            counts[item.event["subject"]] += 1
    assert all(n <= 1 for n in counts.values()), counts
    return all(n == 1 for n in counts.values())


def test_ok_means_the_state_records_the_fact(service: Smsbus) -> None:
    """Under load (32 at once), each callback's state is read the moment it is answered."""
    ids = [str(next(_ids)) for _ in range(640)]
    seen = asyncio.run(callbacks_at_once(service, ids))
    unseen = [i for i, state in seen if state is None or state["status"] != "delivered"]
    assert [] == unseen
    duplicates = service.metric("smsbus_callbacks_total", outcome="duplicate")
    with httpx.Client(timeout=10) as client:
        for server_id in ids[:20]:
            service.callback(client, server_id)  # SMSPilot again: the state knows the fact
    assert duplicates + 20 == service.metric("smsbus_callbacks_total", outcome="duplicate")


def test_a_state_the_bucket_refuses_is_owed_by_the_spool_and_written_later(
    nats_server: NatsServer, service: Smsbus
) -> None:
    bucket = f"KV_{bucket_names(service.stream)[0]}"

    async def limit(full: bool) -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(bucket)
            cap = info.state.messages if full else -1  # a full bucket: new keys are refused
            await js.update_stream(dataclasses.replace(info.config, max_msgs=cap))
        finally:
            await nc.close()

    ids = [str(next(_ids)) for _ in range(5)]
    with httpx.Client(timeout=10) as client:  # a bucket that holds something can be full
        service.callback(client, str(next(_ids)))
    owed = service.metric("smsbus_state_writes_owed_total")
    asyncio.run(limit(full=True))
    try:
        with httpx.Client(timeout=10) as client:
            for server_id in ids:
                service.callback(client, server_id)
            assert service.metric("smsbus_state_writes_owed_total") > owed
            assert (service.spool_depth() or 0) > 0
            wait_for(lambda: stored_once(nats_server, service, ids), what="each event, once")
            assert [None] * len(ids) == [shown(client, service, i) for i in ids]
    finally:
        asyncio.run(limit(full=False))
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: service.spool_depth() == 0, timeout=20, what="the owed states")
        states = [shown(client, service, i) for i in ids]
    assert [("delivered", True)] * len(ids) == [(s["status"], s["final"]) for s in states if s]
    assert stored_once(nats_server, service, ids)  # written, never published again


def test_a_batch_refused_part_way_is_finished_key_by_key(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """No watch runs here, so the mirror knows nothing: every write of the batch expects no
    value, and the one whose key another writer holds is refused."""

    async def scenario() -> None:
        settings = load_settings(isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path)))
        conn = Connection(settings)
        await conn.open(time.monotonic() + 10)
        try:
            buckets = await ensure_all(conn.js, settings)
            refusals: list[str] = []
            states = States(conn, buckets.messages, bucket_names(settings.stream)[0],
                            direct=True, on_batch=refusals.append)  # fmt: skip
            states.atomic, states.batched = buckets.atomic, buckets.states_batched
            assert states.batched
            await states.start()
            ids = [str(next(_ids)) for _ in range(5)]
            keys = [kv_key("smspilot", i) for i in ids]
            item = TrackItem("smspilot", ids[2], phone="79035550000", client_ref="order-7")
            registered = register(None, item, at="2026-01-01T00:00:00.000Z")
            await buckets.messages.put(keys[2], registered.to_json())  # another replica's
            events = [
                status_event(settings.subject_prefix, "smspilot", i, "2", via="callback",
                             received_at=utcnow())
                for i in ids
            ]  # fmt: skip
            changes = [
                (key, functools.partial(apply_status, data=e.data, event_id=e.id))
                for key, e in zip(keys, events, strict=True)
            ]
            failed = await states.apply(changes, batches="fast")
            assert {} == failed
            assert ["refused"] == refusals
            for key, event in zip(keys, events, strict=True):
                state, _ = await read_state(buckets.messages, key)
                assert state is not None and state.records(event.id), key
                assert ("delivered", True) == (state.status, state.final)
            merged, _ = await read_state(buckets.messages, keys[2])
            assert isinstance(merged, MessageState)
            assert ("79035550000", "order-7", True) == (
                merged.phone, merged.client_ref, merged.tracked
            )  # fmt: skip
            await states.stop()
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_a_spool_from_an_earlier_release_opens_and_drains(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite3"
    # The table as releases before owed states made it (committed, then closed).
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE spool (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,"
            " subject TEXT NOT NULL, type TEXT NOT NULL, provider TEXT NOT NULL,"
            " payload BLOB NOT NULL, spooled_at REAL NOT NULL DEFAULT 0)"
        )
        db.execute(
            "INSERT INTO spool (id, subject, type, provider, payload, spooled_at)"
            " VALUES ('e1', 'sms.status.smspilot.delivered', 'status', 'smspilot', x'7b7d', 1)"
        )

    async def scenario() -> None:
        spool = Spool(path)
        await spool.open()
        try:
            [row] = await spool.head(10)
            assert ("e1", False, None) == (row.event.id, row.stored, row.sent)
            await spool.mark_sent([row.seq], 5.0)
            [row] = await spool.head(10)
            assert (5.0, 5.0) == row.sent
            await spool.mark_stored([row.seq])
            [row] = await spool.head(10)
            assert row.stored
            await spool.delete([row.seq])
            assert 0 == spool.depth
        finally:
            await spool.close()

    asyncio.run(scenario())


def test_an_earlier_releases_consumer_is_retired_once_nothing_pulls_from_it(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Releases before this one projected status events through `smsbus-projector`. While one
    of them still pulls from it, it stays; then what it had not acknowledged is applied (states
    of status events, registrations), it is deleted, and the registrations consumer starts after
    what it had acknowledged."""
    monkeypatch.setattr(projector, "LEGACY_CHECK_EVERY", 0.2)
    settings = load_settings(isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path)))
    prefix, stream = settings.subject_prefix, settings.stream
    done, pending = str(next(_ids)), [str(next(_ids)) for _ in range(3)]
    registered = str(next(_ids))

    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            await ensure_all(js, settings)
            await js.add_consumer(stream, ConsumerConfig(  # as an earlier release made it
                durable_name=projector.LEGACY, deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT, ack_wait=5.0,
                filter_subjects=[f"{prefix}.track.>", f"{prefix}.status.>"],
            ))  # fmt: skip
            legacy = await js.pull_subscribe_bind(durable=projector.LEGACY, stream=stream)

            async def publish(event: Any) -> None:
                await js.publish(event.subject, event.payload, headers=event.headers)

            await publish(status_event(prefix, "smspilot", done, "2", via="callback",
                                       received_at=utcnow()))  # fmt: skip
            [msg] = await legacy.fetch(1, timeout=2)
            await msg.ack_sync()  # that release projected it (here: acknowledged it only)
            for message_id in pending:
                await publish(status_event(prefix, "smspilot", message_id, "1",
                                           via="callback", received_at=utcnow()))  # fmt: skip
            await publish(TrackItem("smstower", registered, client_ref="r-1").event(prefix))

            async def pulling(until: asyncio.Event) -> None:  # an earlier release, still up
                while not until.is_set():
                    with contextlib.suppress(TimeoutError):
                        await legacy.fetch(1, timeout=0.5)  # no ack: comes back later

            stop = asyncio.Event()
            puller = asyncio.create_task(pulling(stop))
            async with open_bus(settings) as bus:
                track = await js.consumer_info(stream, projector.DURABLE)
                assert (DeliverPolicy.BY_START_SEQUENCE, 2) == (
                    track.config.deliver_policy, track.config.opt_start_seq
                )  # fmt: skip
                await asyncio.sleep(1.0)  # five checks while it is pulled from
                assert (await js.consumer_info(stream, projector.LEGACY)).name
                stop.set()
                await puller

                async def retired() -> bool:
                    try:
                        await js.consumer_info(stream, projector.LEGACY)
                    except nats.js.errors.NotFoundError:
                        return True
                    return False

                await await_for(retired, what="the earlier release's consumer retired")
                for message_id in pending:
                    state, _ = await read_state(bus.states.kv, kv_key("smspilot", message_id))
                    assert state is not None and "sent" == state.status, message_id
                state, _ = await read_state(bus.states.kv, kv_key("smstower", registered))
                assert state is not None and "r-1" == state.client_ref
                state, _ = await read_state(bus.states.kv, kv_key("smspilot", done))
                assert state is None  # acknowledged by that release: not applied again
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_events_published_together_are_stored_once_and_refused_states_owed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`publish_many` (a poll answer's news, queued in one loop turn): the states the bucket
    refuses are owed by the spool, each event is stored once, and the drainer writes the states
    once the bucket takes them again."""
    settings = load_settings(isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path)))
    bucket = f"KV_{bucket_names(settings.stream)[0]}"
    ids = [str(next(_ids)) for _ in range(20)]

    async def limit(full: bool) -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(bucket)
            cap = info.state.messages if full else -1
            await js.update_stream(dataclasses.replace(info.config, max_msgs=cap))
        finally:
            await nc.close()

    async def scenario() -> None:
        async with open_bus(settings) as runtime:
            prefix, kv = settings.subject_prefix, runtime.states.kv
            events = [status_event(prefix, "smstower", i, "delivered", via="poll",
                                   received_at=utcnow()) for i in ids]  # fmt: skip
            await runtime.publisher.publish_many(events[:1])  # a bucket that holds something
            assert (await read_state(kv, kv_key("smstower", ids[0])))[0] is not None
            events, ids[:] = events[1:], ids[1:]
            await limit(full=True)  # (a cap of 0 would be no cap)
            try:
                await runtime.publisher.publish_many(events)
                owed = runtime.metrics.registry.get_sample_value("smsbus_state_writes_owed_total")
                assert len(ids) == owed
                assert len(ids) == runtime.publisher.spool_depth
                assert [(None, 0)] * len(ids) == [
                    await read_state(kv, kv_key("smstower", i)) for i in ids
                ]
            finally:
                await limit(full=False)

            async def written() -> bool:
                states = [(await read_state(kv, kv_key("smstower", i)))[0] for i in ids]
                return all(s is not None and s.status == "delivered" for s in states)

            await await_for(written, timeout=20, what="the owed states")
            await await_for(
                lambda: _true(runtime.publisher.spool_depth == 0), what="the spool drained"
            )

    asyncio.run(scenario())
    found = read_stream(nats_server.url, settings.stream, f"{settings.subject_prefix}.status.>")
    counts = {i: 0 for i in ids}
    for item in found:
        if item.event["subject"] in counts:
            counts[item.event["subject"]] += 1
    assert {i: 1 for i in ids} == counts  # stored once each, never published again


async def _true(value: bool) -> bool:
    return value
