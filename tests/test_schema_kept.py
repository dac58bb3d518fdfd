"""The stream and the buckets deleted under a running smsbus (an operator's `nats stream rm` or
`nats kv del`, a clean-up script, a server brought back on an empty store without a
reconnection): smsbus makes them again, as at start, instead of answering from the spool for as
long as it runs."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.js.errors

from bus.config import load_settings
from bus.connection import Connection
from bus.messages import TrackItem, apply_status, kv_key
from bus.state import States, read_state
from bus.stream import bucket_names, ensure_all
from bus.supervisor import Beat, TaskStatus
from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import (
    NatsServer,
    Smsbus,
    await_for,
    isolated_env,
    quiet,
    read_stream,
    stream_count,
    wait_for,
)


async def _delete(url: str, *streams: str) -> None:
    nc = await nats.connect(url, error_cb=quiet)
    try:
        for name in streams:
            await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


async def _entry(url: str, bucket: str, key: str) -> tuple[bytes, int] | None:
    """A key's value and revision in a bucket; None when it has none."""
    nc = await nats.connect(url, error_cb=quiet)
    try:
        entry = await (await nc.jetstream().key_value(bucket)).get(key)
        return entry.value or b"", entry.revision or 0
    except nats.js.errors.KeyNotFoundError:
        return None
    finally:
        await nc.close()


def test_a_stream_and_a_bucket_deleted_under_a_running_smsbus_are_made_again(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus").start()
    try:
        with httpx.Client(timeout=10) as http:
            states = f"KV_{bucket_names(bus.stream)[0]}"
            asyncio.run(_delete(server.url, bus.stream, states))
            for server_id in ("7001", "7002", "7003"):
                answer = http.get(f"{bus.base}/callbacks/smspilot",
                                  params={"server_id": server_id, "status": 2})  # fmt: skip
                assert (200, "OK") == (answer.status_code, answer.text)
            wait_for(lambda: bus.spool_depth() == 0, timeout=15, what="the spool to drain")
            wait_for(bus.ready, timeout=5, what="smsbus ready again")
            bus.register({"provider": "smspilot", "message_id": "7004", "client_ref": "order-4"})
            answer = http.get(f"{bus.base}/callbacks/smspilot",
                              params={"server_id": "7004", "status": 2})  # fmt: skip
            assert "OK" == answer.text
            state = http.get(f"{bus.api}/v1/messages/smspilot/7004").json()
            assert ("delivered", "order-4") == (state["status"], state["client_ref"])
        stored = read_stream(server.url, bus.stream, f"{bus.prefix}.status.>")
        assert ["7001", "7002", "7003", "7004"] == [e.event["subject"] for e in stored]
        assert "order-4" == stored[-1].event["data"]["client_ref"]
        said = [line for line in bus.log_lines() if line.get("missing") or line.get("made")]
        assert [bus.stream, states] == said[0]["missing"] == said[-1]["made"]
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()


def test_a_nats_server_back_on_an_empty_store_is_taken_as_a_new_one(tmp_path: Path) -> None:
    """A server started again without its data (a NATS container without a volume, a volume
    lost): at the reconnection smsbus makes the stream and buckets again, its mirror starts
    over from the new bucket's first write, and what follows works as on a new server:
    registrations, callbacks with their registration's data, polls."""
    tower = FakeSmstower()
    server = NatsServer(tmp_path / "nats").start()
    with Served(tower.app) as t:
        bus = Smsbus(isolated_env(server.url, **tower.settings(t.url)), tmp_path / "bus").start()
        try:
            with httpx.Client(timeout=10) as http:
                # Before: the bucket's sequence well above what the new one will reach.
                bus.register(*({"provider": "smspilot", "message_id": str(8000 + i)}
                               for i in range(200)))  # fmt: skip
                server.stop()
                shutil.rmtree(server.store_dir / "jetstream")
                server.start()
                wait_for(lambda: bus.reconnections() >= 2, timeout=15, what="both connections")
                wait_for(bus.ready, timeout=15, what="smsbus ready on the new store")
                tower.statuses["5001"] = ("delivered", msk_now())
                bus.register(
                    {"provider": "smstower", "message_id": "5001", "client_ref": "t1"},
                    {"provider": "smspilot", "message_id": "9001", "client_ref": "p1"},
                )
                answer = http.get(f"{bus.base}/callbacks/smspilot",
                                  params={"server_id": "9001", "status": 2})  # fmt: skip
                assert "OK" == answer.text

                def stored() -> list[tuple[str, str, str | None]]:
                    found = read_stream(server.url, bus.stream, f"{bus.prefix}.status.>")
                    return [(e.event["subject"], e.event["data"]["status"],
                             e.event["data"]["client_ref"]) for e in found]  # fmt: skip

                wait_for(lambda: len(stored()) == 2, timeout=15, what="the poll of 5001")
                assert [("9001", "delivered", "p1"), ("5001", "delivered", "t1")] == stored()
                state = http.get(f"{bus.api}/v1/messages/smstower/5001").json()
                assert ("delivered", "t1") == (state["status"], state["client_ref"])
            assert [] == bus.readyz()["degraded"]
            assert 0 == bus.stop()
        finally:
            bus.kill()
            server.stop()


def test_what_a_nats_server_back_on_an_empty_store_lost_is_written_back(tmp_path: Path) -> None:
    """A server started again without its data forgot every registration, every fact and every
    cursor it held; two replicas held them and write them back: the messages are polled again,
    their events carry their `client_ref`, a fact reported before the loss and repeated after
    it is not stored again, the states read on either replica are whole, and an inbound SMS
    published before the loss is not published again (a lost inbound cursor looks back a day)
    by the replica that did not poll before it."""
    tower = FakeSmstower()
    server = NatsServer(tmp_path / "nats").start()
    towers = [str(5000 + i) for i in range(120)]
    with Served(tower.app) as t:
        env = isolated_env(server.url, **tower.settings(t.url))
        buses = [Smsbus(env, tmp_path / name).start() for name in ("a", "b")]
        try:
            with httpx.Client(timeout=10) as http:
                for message in towers:
                    tower.statuses[message] = ("processing", msk_now())
                tower.inbound.append({"id": "in-1", "from": "79030001122", "to": "79030001133",
                                      "text": "before", "created": msk_now(-120)})  # fmt: skip
                buses[0].register(
                    *({"provider": "smstower", "message_id": m, "client_ref": f"t{m}"}
                      for m in towers),
                    {"provider": "smspilot", "message_id": "9001", "client_ref": "p1",
                     "phone": "79001234567"},
                )  # fmt: skip
                buses[1].callback(http, "9002", status=1)
                for bus in buses:
                    wait_for(lambda b=bus: b.metric("smsbus_tracked_messages",
                                                    provider="smstower") == len(towers),
                             timeout=15, what="both mirrors to hold the registrations")  # fmt: skip

                def stored() -> list[dict[str, Any]]:
                    found = read_stream(server.url, buses[0].stream, f"{buses[0].prefix}.status.>")
                    return [e.event["data"] for e in found]

                def count(kind: str = "status") -> int:
                    return stream_count(server.url, buses[0].stream, f"{buses[0].prefix}.{kind}.>")

                # Each message polled once as `sent` before the loss, the inbound SMS once.
                wait_for(lambda: count() == len(towers) + 1, timeout=30, what="first polls")
                wait_for(lambda: count("inbound") == 1, timeout=15, what="the inbound poll")
                cursors = bucket_names(buses[0].stream)[1]

                def cursor_known() -> bool:
                    """The inbound cursor saved with the SMS, and both replicas past it (the
                    poller may lead on either after the loss)."""
                    saved = asyncio.run(_entry(server.url, cursors, "smstower.inbound"))
                    return (
                        saved is not None
                        and b"in-1" in saved[0]
                        and all(
                            b.readyz()["watches"]["cursor-mirror"]["last_sequence"] >= saved[1]
                            for b in buses
                        )
                    )

                wait_for(cursor_known, timeout=15, what="the inbound cursor on both replicas")
                # The poller's leader is stopped over the loss: the other one leads after it,
                # with the cursor it only ever followed.
                leader = next(b for b in buses if b.readyz()["providers"]["smstower"]["leader"])
                other = next(b for b in buses if b is not leader)
                assert leader.proc is not None
                leader.proc.send_signal(signal.SIGSTOP)
                server.stop()
                shutil.rmtree(server.store_dir / "jetstream")
                server.start()
                wait_for(lambda: other.reconnections() >= 2, timeout=15, what="both connections")
                wait_for(other.ready, timeout=15, what="smsbus ready on the new store")
                for message in towers:
                    tower.statuses[message] = ("delivered", msk_now())
                tower.inbound.append({"id": "in-2", "from": "79030001144", "to": "79030001133",
                                      "text": "after", "created": msk_now(-1)})  # fmt: skip
                other.callback(http, "9002", status=1)  # reported before the loss
                other.callback(http, "9001", status=2)
                wait_for(lambda: count() >= len(towers) + 1, timeout=30,
                         what="the written-back messages polled")  # fmt: skip
                wait_for(lambda: count("inbound") >= 1, timeout=15, what="the inbound poll")
                leader.proc.send_signal(signal.SIGCONT)
                wait_for(lambda: leader.reconnections() >= 2, timeout=15, what="its connections")
                wait_for(lambda: any(line.get("event") == "states written back"
                                     for line in leader.log_lines()),
                         timeout=15, what="the stopped replica's write-back")  # fmt: skip
                after = stored()
                assert sorted(towers) == sorted(d["message_id"] for d in after
                                                if d["provider"] == "smstower")  # fmt: skip
                assert all(d["client_ref"] == f"t{d['message_id']}" and d["status"] == "delivered"
                           for d in after if d["provider"] == "smstower")  # fmt: skip
                assert [("9001", "delivered", "p1", "79001234567")] == [
                    (d["message_id"], d["status"], d["client_ref"], d["phone"])
                    for d in after if d["provider"] == "smspilot"
                ]  # fmt: skip
                inbound = read_stream(server.url, buses[0].stream, f"{buses[0].prefix}.inbound.>")
                assert ["in-2"] == [e.event["data"]["message_id"] for e in inbound]
                for bus in buses:
                    state = http.get(f"{bus.api}/v1/messages/smstower/{towers[7]}").json()
                    assert ("delivered", f"t{towers[7]}") == (state["status"], state["client_ref"])
                    state = http.get(f"{bus.api}/v1/messages/smspilot/9002").json()
                    assert "sent" == state["status"]
            said = [line for bus in buses for line in bus.log_lines()
                    if line.get("event") == "states written back"]  # fmt: skip
            assert said and all(line["states"] == len(towers) + 2 for line in said), said
            for bus in buses:
                assert 0 == bus.stop()
        finally:
            for bus in buses:
                bus.kill()
            server.stop()


def test_a_state_not_written_back_yet_is_read_where_it_was_held(tmp_path: Path) -> None:
    """The bucket made anew under a follower that has gone past its new writes (so only the
    stream's creation time tells it apart), another replica's report since for one message:
    until the write-back, a read finds what the mirror held; a write-back the bucket refuses is
    shown failing and tried again; after it, the bucket has the registration and the facts of
    both."""
    server = NatsServer(tmp_path / "nats").start()

    async def scenario() -> None:
        settings = load_settings(isolated_env(server.url, SMSBUS_DATA_DIR=str(tmp_path)))
        conn = Connection(settings)
        await conn.open(time.monotonic() + 10)
        tasks: list[asyncio.Task[None]] = []
        try:
            buckets = await ensure_all(conn.js, settings)
            name = bucket_names(settings.stream)[0]
            states = States(conn, buckets.messages, name, direct=True)
            states.atomic, states.batched = buckets.atomic, buckets.states_batched
            await states.start()
            tasks.append(asyncio.create_task(states.follower.run(Beat(TaskStatus("mirror")))))
            await states.register(
                [TrackItem("smstower", "77", client_ref="r-77"),
                 TrackItem("smspilot", "78", client_ref="r-78")],
                at="2026-12-07T10:00:00.000Z",
            )  # fmt: skip

            async def mirrored() -> bool:
                return states.follower.last == 2 and states.mirror.held == 2

            await await_for(mirrored, what="the mirror to follow both writes")
            await conn.js.delete_stream(f"KV_{name}")
            buckets = await ensure_all(conn.js, settings)
            sent = {"provider": "smspilot", "message_id": "78", "status": "sent", "final": False,
                    "provider_status": "1", "occurred_at": "2026-12-07T10:00:05.000Z"}  # fmt: skip
            since = apply_status(None, sent, "s" * 64)
            await buckets.messages.put(kv_key("smspilot", "78"), since.to_json())
            for other in ("90", "91"):  # the new bucket's sequence past the follower's
                await buckets.messages.put(kv_key("smspilot", other), since.to_json())

            async def lost() -> bool:
                return states.writing_back == 2

            await await_for(lost, what="the follower to see a new bucket")
            held = await states.lookup("smstower", "77")
            assert held is not None and ("r-77", True) == (held.client_ref, held.tracked)
            assert (None, 0) == await read_state(buckets.messages, kv_key("smstower", "77"))
            # Held, and reported since on another replica: both, as the write-back will merge.
            both = await states.lookup("smspilot", "78")
            assert both is not None and ("r-78", "sent") == (both.client_ref, both.status)
            assert both.records("s" * 64)
            # A bucket that takes no more for a while (an operator's limit): the write-back is
            # shown failing and tried again.
            config = (await conn.js.stream_info(f"KV_{name}")).config
            config.max_msgs = 3
            await conn.js.update_stream(config)
            status = TaskStatus("state-write-back")
            tasks.append(asyncio.create_task(states.write_back(Beat(status))))

            async def failing() -> bool:
                return status.state == "failing"

            await await_for(failing, what="the write-back to show it fails")
            # The merge into a key the bucket has replaces its value; the new key is refused.
            assert 1 == states.writing_back
            assert "states not written back" in (status.last_error or "")
            config.max_msgs = -1
            await conn.js.update_stream(config)

            async def written() -> bool:
                return states.writing_back == 0 and status.state == "running"

            await await_for(written, timeout=20, what="the write-back")
            back, _ = await read_state(buckets.messages, kv_key("smstower", "77"))
            assert back is not None and ("r-77", True) == (back.client_ref, back.tracked)
            merged, _ = await read_state(buckets.messages, kv_key("smspilot", "78"))
            assert merged is not None
            assert ("r-78", True, "sent") == (merged.client_ref, merged.tracked, merged.status)
            assert merged.records("s" * 64)
            await states.stop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await conn.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
