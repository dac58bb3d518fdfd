"""Read your writes and exactly once per fact, with two replicas on one NATS: a callback right
after `POST /v1/messages` answered 202 carries the tracking data on either replica, and a fact
repeated after the stream's duplicate window (by a callback, or from a spool) is not stored
again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from bus import landed
from bus.events import status_event, utcnow
from tests.support import (
    HangingLink,
    NatsServer,
    Smsbus,
    Stored,
    await_for,
    isolated_env,
    read_stream,
    wait_for,
)

pytestmark = pytest.mark.slow
WINDOW = 2.0
_ids = itertools.count(random.randrange(10**8, 10**9))


@pytest.fixture(scope="module")
def pair(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Smsbus]]:
    env = isolated_env(nats_server.url, SMSBUS_DUPLICATE_WINDOW=str(WINDOW))
    root = tmp_path_factory.mktemp("pair")
    buses = [Smsbus(env, root / name).start() for name in ("a", "b")]
    yield buses
    for bus in buses:
        assert 0 == bus.stop()


def stored(nats: NatsServer, bus: Smsbus, message_id: str) -> list[Stored]:
    found = read_stream(nats.url, bus.stream, f"{bus.prefix}.status.smspilot.>")
    return [s for s in found if s.event["subject"] == message_id]


@pytest.mark.parametrize("where", ["same", "other"])
def test_a_callback_right_after_the_202_carries_the_tracking_data(
    where: str, nats_server: NatsServer, pair: list[Smsbus]
) -> None:
    registrar, receiver = pair[0], pair[0] if where == "same" else pair[1]
    ids = [str(next(_ids)) for _ in range(40)]
    with httpx.Client(timeout=10) as client:
        for n, server_id in enumerate(ids):
            item = {"provider": "smspilot", "message_id": server_id,
                    "phone": f"7903{n:07d}", "client_ref": f"order-{server_id}"}  # fmt: skip
            answer = client.post(f"{registrar.api}/v1/messages", json=item)
            assert 202 == answer.status_code, answer.text
            receiver.callback(client, server_id, 1)
    for n, server_id in enumerate(ids):
        [event] = wait_for(lambda i=server_id: stored(nats_server, receiver, i), what="the event")
        data = event.event["data"]
        assert (f"7903{n:07d}", f"order-{server_id}") == (data["phone"], data["client_ref"])


def test_a_fact_repeated_after_the_duplicate_window_is_not_stored_again(
    nats_server: NatsServer, pair: list[Smsbus]
) -> None:
    server_id = str(next(_ids))
    with httpx.Client(timeout=10) as client:
        pair[0].callback(client, server_id, 2)
        wait_for(lambda: stored(nats_server, pair[0], server_id), what="the event")

        def recorded() -> bool:
            answer = client.get(f"{pair[0].api}/v1/messages/smspilot/{server_id}")
            return answer.status_code == 200 and answer.json()["status"] == "delivered"

        wait_for(recorded, what="the state to record the fact")
        time.sleep(WINDOW + 0.5)  # the scenario itself: JetStream has forgotten the id
        for bus in pair:  # SMSPilot retrying late, at either replica
            bus.callback(client, server_id, 2)
        pair[1].callback(client, server_id, 1)  # a new fact is still stored
        wait_for(lambda: len(stored(nats_server, pair[0], server_id)) == 2, what="the new fact")
    facts = [s.event["data"]["provider_status"] for s in stored(nats_server, pair[0], server_id)]
    assert ["2", "1"] == facts

    def duplicates() -> int:
        return sum(
            1
            for bus in pair
            for line in bus.log_lines()
            if line.get("event") == "callback" and line.get("outcome") == "duplicate"
            and line.get("server_id") == server_id
        )  # fmt: skip

    # A summary line is written just after its answer (receiver/smspilot.py).
    wait_for(lambda: duplicates() >= 2, what="the two duplicates' summary lines")
    assert 2 == duplicates()


def test_a_spooled_fact_already_recorded_is_dropped_after_the_window(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A publish that timed out but landed, and was applied, then sat in the spool past the
    duplicate window (an outage, a crash): draining it must not store a second copy."""
    env = isolated_env(nats_server.url, SMSBUS_DUPLICATE_WINDOW=str(WINDOW))
    bus = Smsbus(env, tmp_path / "bus").start()
    server_id = str(next(_ids))
    with httpx.Client(timeout=10) as client:
        bus.callback(client, server_id, 2)
        wait_for(lambda: stored(nats_server, bus, server_id), what="the event")
        wait_for(
            lambda: client.get(f"{bus.api}/v1/messages/smspilot/{server_id}").status_code == 200,
            what="the fact recorded",
        )
    assert 0 == bus.stop()
    # What a spool holds after such a publish: the same event, spooled before the window.
    event = status_event(bus.prefix, "smspilot", server_id, "2", via="callback",
                         received_at=utcnow())  # fmt: skip
    fresh = status_event(bus.prefix, "smspilot", str(next(_ids)), "2", via="callback",
                         received_at=utcnow())  # fmt: skip
    with contextlib.closing(sqlite3.connect(bus.data_dir / "spool.sqlite3")) as db, db:
        db.executemany(
            "INSERT INTO spool (id, subject, type, provider, payload, spooled_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(e.id, e.subject, e.type, e.provider, e.payload, time.time() - 2 * WINDOW)
             for e in (event, fresh)],
        )  # fmt: skip
    time.sleep(WINDOW + 0.5)
    bus.start()
    wait_for(lambda: bus.spool_depth() == 0, what="the spool to drain")
    assert 1 == len(stored(nats_server, bus, server_id))
    fresh_id = orjson.loads(fresh.payload)["subject"]
    assert 1 == len(stored(nats_server, bus, fresh_id))  # an unrecorded fact is published
    assert 0 == bus.stop()


def others(url: str, stream: str, subject: str, count: int) -> int:
    """`count` other events on `subject`, each with an id of its own, as a busy stream holds
    them; the number of messages in the stream once they are stored."""

    async def publish() -> int:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            held = (await js.stream_info(stream)).state.messages
            for n in range(count):
                await nc.publish(subject, b"{}", headers={"Nats-Msg-Id": f"other-{next(_ids)}"})
                if n % 10_000 == 9_999:
                    await nc.flush()
            await nc.flush()

            async def stored() -> bool:  # a server that drops some (not acked) fails, not hangs
                return (await js.stream_info(stream)).state.messages >= held + count

            await await_for(stored, timeout=60, what=f"{count} more messages in the stream")
            return (await js.stream_info(stream)).state.messages
        finally:
            await nc.close()

    return asyncio.run(publish())


# More than the 200,000 messages the search once read at most, on either side of the event.
BUSY = 150_000


@pytest.mark.parametrize("case", ["landed", "lost", "landed-busy"])
def test_a_spooled_event_sent_without_an_answer_is_stored_once_after_an_outage_past_the_window(
    case: str, tmp_path: Path
) -> None:
    """A publish whose ack never came: the path back from nats-server hangs (the event landed)
    or both ways do (it did not). The callback is answered from the spool, and nats-server then
    goes down for longer than the duplicate window, so it would no longer drop a repeat of the
    id; SMSPilot repeats the report meanwhile (spooled behind it, never sent). The drainer looks
    for the event in the stream: found, neither copy is published again and its state is
    written; not found, it is published. Either way the stream holds it once. On a busy stream
    (`landed-busy`: BUSY other events on its subject before it and after it) it is found too."""
    landed, busy = case != "lost", case == "landed-busy"
    nats = NatsServer(tmp_path / "nats").start()
    link = HangingLink(nats.port)
    env = isolated_env(link.url, SMSBUS_DUPLICATE_WINDOW=str(WINDOW), SMSBUS_PUBLISH_TIMEOUT="0.5")
    bus = Smsbus(env, tmp_path / "bus")
    try:
        bus.start()
        server_id = str(next(_ids))
        subject = status_event(bus.prefix, "smspilot", server_id, "2", via="callback",
                               received_at=utcnow()).subject  # fmt: skip
        with httpx.Client(timeout=10) as client:
            link.hang("smsbus", answers_only=landed)  # the bucket reads still answered
            held = others(nats.url, bus.stream, subject, BUSY) if busy else 0
            bus.callback(client, server_id, 2)
            assert 1 == bus.spool_depth()
            if busy:
                wait_for(lambda: held + 1 == others(nats.url, bus.stream, subject, 0),
                         what="the event stored")  # fmt: skip
                held = others(nats.url, bus.stream, subject, BUSY)
            else:
                assert int(landed) == len(stored(nats, bus, server_id))
            nats.kill()
            bus.callback(client, server_id, 2)
            assert 2 == bus.spool_depth()
            time.sleep(WINDOW + 0.5)  # the scenario itself: the outage outlasts the window
            nats.start()
            link.cut()
            wait_for(lambda: bus.spool_depth() == 0, timeout=30, what="the spool to drain")
            state = client.get(f"{bus.api}/v1/messages/smspilot/{server_id}")
        if busy:  # reading them all back would take long: nothing more was stored
            assert held == others(nats.url, bus.stream, subject, 0)
        else:
            assert 1 == len(stored(nats, bus, server_id))
        assert (200, "delivered") == (state.status_code, state.json()["status"])
        found = [
            line["count"] for line in bus.log_lines()
            if line.get("event") == "spooled events found in the stream; not published again"
        ]  # fmt: skip
        assert ([2] if landed else []) == found
    finally:
        if bus.proc is not None and bus.proc.poll() is None:
            bus.kill()
        link.close()
        nats.stop()


def test_the_search_for_landed_events_finds_ids_between_two_times(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stored_ids` (the clocks' slack left out) tells which of the ids looked for are stored on
    one subject between two times, stops reading once it has found them all, and gives None
    rather than an answer once it would read more than MAX_SCANNED."""
    monkeypatch.setattr(landed, "SLACK", 0.0)
    stream, subject = f"L{next(_ids)}", f"l{next(_ids)}.status.smspilot.delivered"
    ids = {"a", "b", "c", "ax", "bx", "cx", "zz"}

    async def scenario() -> list[set[str] | None]:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name=stream, subjects=[subject, subject + "x"])
            times = []
            for name in ("a", "b", "c"):
                times.append(time.time())
                await js.publish(subject, b"{}", headers={"Nats-Msg-Id": name})
                await js.publish(subject + "x", b"{}", headers={"Nats-Msg-Id": name + "x"})
                await asyncio.sleep(0.05)
            now = time.time()
            found = [
                await landed.stored_ids(nc, js, stream, subject, times[1], times[2] - 0.01, ids),
                await landed.stored_ids(nc, js, stream, subject, times[0] - 1, now, ids),
                await landed.stored_ids(nc, js, stream, subject, times[0] - 1, now, {"zz"}),
            ]
            monkeypatch.setattr(landed, "MAX_SCANNED", 1)
            monkeypatch.setattr(landed, "FETCH", 1)
            found += [  # "a" is the first message read; "c" would be the third
                await landed.stored_ids(nc, js, stream, subject, times[0] - 1, now, {"a"}),
                await landed.stored_ids(nc, js, stream, subject, times[0] - 1, now, {"c"}),
            ]
            consumers = (await js.stream_info(stream)).state.consumer_count
            await js.delete_stream(stream)
            return [*found, {str(consumers)}]
        finally:
            await nc.close()

    assert [{"b"}, {"a", "b", "c"}, set(), {"a"}, None, {"0"}] == asyncio.run(scenario())
