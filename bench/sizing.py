"""Disk per event and per state, measured: `smsbus serve` on a nats-server of its own, N callbacks
(each a status event in the stream and a state in the bucket) and N registrations, then the
stream's and the bucket's bytes as nats-server reports them, and the store directory on disk.

    .venv/bin/python bench/sizing.py [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import NatsServer, Smsbus, isolated_env, wait_for  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


async def stream_bytes(url: str, *names: str) -> dict[str, tuple[int, int]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = {}
        for name in names:
            state = (await js.stream_info(name)).state
            out[name] = (state.messages, state.bytes)
        return out
    finally:
        await nc.close()


async def load(bus: Smsbus, n: int) -> None:
    base = random_base = int(time.time()) * 10**6
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        gate = asyncio.Semaphore(32)

        async def callback(i: int) -> None:
            async with gate:
                params = {"server_id": base + i, "status": 2, "error": 0, "ref": f"order-{i}"}
                await client.get(f"{bus.base}/callbacks/smspilot", params=params)

        await asyncio.gather(*(callback(i) for i in range(n)))
        for start in range(0, n, 300):
            batch = [
                {"provider": "smstower", "message_id": str(random_base + 10**9 + i),
                 "phone": f"7903{i:07d}", "client_ref": f"order-{i}",
                 "sent_at": "2026-11-22T10:00:00Z"}
                for i in range(start, min(n, start + 300))
            ]  # fmt: skip
            answer = await client.post(f"{bus.api}/v1/messages", json=batch)
            assert answer.status_code == 202, answer.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory(prefix="smsbus-sizing-") as work:
        root = Path(work)
        server = NatsServer(root / "nats").start()
        bus = Smsbus(isolated_env(server.url), root / "bus").start()
        try:
            empty = du(root / "nats")
            asyncio.run(load(bus, n))
            stream, bucket = bus.stream, f"KV_{bus.stream}_messages"

            def settled() -> dict[str, tuple[int, int]] | None:
                sizes = asyncio.run(stream_bytes(server.url, stream, bucket))
                return sizes if sizes[bucket][0] >= 2 * n and sizes[stream][0] >= n else None

            sizes = wait_for(settled, timeout=120, what="every state projected")
        finally:
            bus.stop()
            server.stop()
        disk = du(root / "nats") - empty
    (events, event_bytes), (states, state_bytes) = sizes[stream], sizes[bucket]
    print(f"{n} callbacks (status events) and {n} registrations (tracked SMSTOWER messages)")
    print(f"stream {stream}: {events} events, {event_bytes / events * 1000 / 1e6:.2f} MB per "
          "1,000 events (nats-server's count)")  # fmt: skip
    print(f"bucket {bucket}: {states} states, {state_bytes / states * 1000 / 1e6:.2f} MB per "
          "1,000 states")  # fmt: skip
    print(f"store directory on disk: {disk / 1e6:.1f} MB for both "
          f"({disk / (events + states) * 1000 / 1e6:.2f} MB per 1,000 of either)")  # fmt: skip


if __name__ == "__main__":
    main()
