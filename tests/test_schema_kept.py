"""The stream and the buckets deleted under a running smsbus (an operator's `nats stream rm` or
`nats kv del`, a clean-up script, a server brought back on an empty store without a
reconnection): smsbus makes them again, as at start, instead of answering from the spool for as
long as it runs."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import nats

from bus.stream import bucket_names
from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import NatsServer, Smsbus, isolated_env, quiet, read_stream, wait_for


async def _delete(url: str, *streams: str) -> None:
    nc = await nats.connect(url, error_cb=quiet)
    try:
        for name in streams:
            await nc.jetstream().delete_stream(name)
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
