"""The stream and the buckets deleted under a running smsbus (an operator's `nats stream rm` or
`nats kv del`, a clean-up script, a server brought back on an empty store without a
reconnection): smsbus makes them again, as at start, instead of answering from the spool for as
long as it runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import nats

from bus.stream import bucket_names
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
