"""How fast the drainer's search for landed events reads the stream (README "Beyond the window").

A nats-server of its own, a stream holding N status events on one subject (each with its
`Nats-Msg-Id`, about the size of smsbus's), then, side by side in rounds: the search as the
drainer runs it (`bus.landed.stored_ids`, headers read raw, looking for the last id, so it reads
all of them) and the same range read through nats-py's fetch (`bus.scan.held`, headers only), which
the search used before. Each prints messages a second; and a search for an id near the start,
which stops there.

    .venv/bin/python bench/landed.py [--messages 1000000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus import landed, scan  # noqa: E402
from tests.support import NatsServer  # noqa: E402

STREAM = "BENCH"
SUBJECT = "sms.status.smspilot.delivered"
PAYLOAD = b'{"specversion":"1.0","type":"sms.status","data":{"pad":"' + b"x" * 600 + b'"}}'


async def fill(js: nats.js.JetStreamContext, nc: nats.NATS, n: int) -> None:
    await js.add_stream(name=STREAM, subjects=["sms.>"])
    for i in range(n):
        await nc.publish(SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": f"fact-{i:012d}"})
        if i % 10_000 == 9_999:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(STREAM)).state.messages < n:
        await asyncio.sleep(0.2)


async def with_fetch(js: nats.js.JetStreamContext, start: float, end: float) -> int:
    since = datetime.fromtimestamp(start, UTC)
    read = 0
    messages = scan.held(js, STREAM, SUBJECT, since, headers_only=True, batch=landed.FETCH)
    async with contextlib.aclosing(messages):
        async for msg in messages:
            if msg.metadata.timestamp.timestamp() > end:
                break
            read += 1
    return read


async def main(n: int, rounds: int) -> None:
    print(f"== the search for landed events: {n} messages on one subject, {rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream(timeout=30)
            start = time.time() - 1
            await fill(js, nc, n)
            end = time.time() + 1
            raw, fetch = [], []
            for r in range(rounds):
                t0 = time.perf_counter()
                last = {f"fact-{n - 1:012d}"}
                found = await landed.stored_ids(nc, js, STREAM, SUBJECT, start, end, last)
                raw.append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                read = await with_fetch(js, start, end)
                fetch.append(read / (time.perf_counter() - t0))
                print(f"round {r + 1}: raw search {raw[-1]:,.0f} messages/s (found "
                      f"{len(found or ())}); nats-py fetch {fetch[-1]:,.0f} messages/s "
                      f"(read {read})")  # fmt: skip
            t0 = time.perf_counter()
            tenth = {f"fact-{9:012d}"}
            found = await landed.stored_ids(nc, js, STREAM, SUBJECT, start, end, tenth)
            early = time.perf_counter() - t0
            fast, slow = statistics.median(raw), statistics.median(fetch)
            print(f"median: raw {fast:,.0f}/s, fetch {slow:,.0f}/s, raw/fetch {fast / slow:.1f}")
            print(f"an id tenth in the range: found {len(found or ())} in {early * 1000:.1f} ms")
        finally:
            await nc.close()
            server.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.rounds))
