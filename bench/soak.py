"""Soak: a steady callback load with the pollers busy, sampling for leaks. Loopback only; stops by
itself; prints every sample and exits 1 on growth that looks like a leak.

One `smsbus serve` on a real nats-server, with:
- callbacks at --rate per second (default 500), each a new server_id, over 16 keep-alive
  connections, timed from request to `OK`;
- the SMSTOWER poller busy against the test suite's fake SMSTOWER: 20 messages registered a
  second, each `processing` and then `delivered` 10 s later, 2 inbound SMS a second, and a
  balance reading every 5 s.
Every --every seconds it samples smsbus's RSS and open file descriptors and the window's p99.
After a warm-up (the first quarter of the samples), it fails when RSS keeps climbing (over
MB_PER_MIN and more than max(16 MB, 10%) in all), descriptors grow by more than 10, p99 triples
(and passes 50 ms), any callback is not answered `OK`, or the load falls short of its rate.

    .venv/bin/python bench/soak.py [--duration 600] [--every 30] [--rate 500]
(with CI set in the environment the defaults are 60 s and 10 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from procfs import open_fds, rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.server import Served  # noqa: E402
from tests.fakes.smstower import FakeSmstower, msk_now  # noqa: E402
from tests.support import NatsServer, Smsbus  # noqa: E402

PATH = "/callbacks/smspilot"
CONNECTIONS = 16
MB_PER_MIN = 1.0  # 60 MB an hour
DELIVERED_AFTER = 10.0


@dataclass
class Sample:
    at: float
    seconds: float  # the window's length
    sent: int
    not_ok: int
    p50_ms: float
    p99_ms: float
    rss_mb: float
    fds: int
    tracked: int


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class Load:
    """Callbacks at a steady rate over keep-alive connections; latencies kept per window."""

    def __init__(self, base: str, rate: float) -> None:
        self.host, port = base.removeprefix("http://").split(":")
        self.port = int(port)
        self.rate = rate
        self.window: list[float] = []
        self.sent = 0
        self.not_ok = 0
        self.ids = random.randrange(10**11, 10**12)

    async def run(self, until: float) -> None:
        free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        for _ in range(CONNECTIONS):
            free.put_nowait(await asyncio.open_connection(self.host, self.port))
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        i = 0
        while time.perf_counter() < until:
            delay = start + i / self.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._one(free, str(self.ids + i)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.gather(*tasks)
        while not free.empty():
            free.get_nowait()[1].close()

    async def _one(self, free: asyncio.Queue, server_id: str) -> None:  # type: ignore[type-arg]
        reader, writer = await free.get()
        started = time.perf_counter()
        writer.write(
            f"GET {PATH}?server_id={server_id}&status=2 HTTP/1.1\r\nHost: s\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        self.window.append((time.perf_counter() - started) * 1000)
        self.sent += 1
        if not head.startswith(b"HTTP/1.1 200") or body != b"OK":
            self.not_ok += 1
        free.put_nowait((reader, writer))


class Providers:
    """Keeps the SMSTOWER poller busy: registrations, status changes, inbound SMS."""

    def __init__(self, tower: FakeSmstower, base: str) -> None:
        self.tower = tower
        self.base = base
        self.registered = 0
        self.next_id = random.randrange(10**9, 10**10)
        self.pending: list[tuple[float, str]] = []

    async def run(self, until: float) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=10) as client:
            while time.monotonic() < until:
                batch = [str(self.next_id + i) for i in range(20)]
                self.next_id += 20
                for message_id in batch:
                    self.tower.statuses[message_id] = ("processing", "")
                answer = await client.post(
                    "/v1/messages", json=[{"provider": "smstower", "message_id": m} for m in batch]
                )
                if answer.status_code == 202:
                    self.registered += len(batch)
                    self.pending += [(time.monotonic() + DELIVERED_AFTER, m) for m in batch]
                now = time.monotonic()
                while self.pending and self.pending[0][0] <= now:
                    _, message_id = self.pending.pop(0)
                    self.tower.statuses[message_id] = ("delivered", msk_now())
                for _ in range(2):
                    self.next_id += 1
                    self.tower.inbound.append(
                        {"id": str(self.next_id), "from": "79030001122", "to": "79990000000",
                         "text": "soak", "created": msk_now()}
                    )  # fmt: skip
                del self.tower.inbound[:-200]  # the fake answers from a bounded list
                await asyncio.sleep(1)


async def tracked(base: str) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{base}/metrics")).text
    for line in text.splitlines():
        if line.startswith('smsbus_tracked_messages{provider="smstower"}'):
            return int(float(line.split()[-1]))
    return -1


async def soak(bus: Smsbus, tower: FakeSmstower, args: argparse.Namespace) -> list[Sample]:
    assert bus.proc is not None
    pid = bus.proc.pid
    started = time.monotonic()
    until = started + args.duration
    load = Load(bus.base, args.rate)
    providers = Providers(tower, bus.api)
    running = asyncio.gather(load.run(time.perf_counter() + args.duration), providers.run(until))
    samples: list[Sample] = []
    print(f"{'at s':>6} {'sent':>8} {'not OK':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'RSS MB':>7} {'fds':>5} {'open tracked':>12}")  # fmt: skip
    sent_before, window_start = 0, started
    while time.monotonic() < until - 0.5:
        await asyncio.sleep(min(args.every, until - time.monotonic()))
        window, load.window = load.window, []
        now = time.monotonic()
        sample = Sample(
            at=now - started,
            seconds=now - window_start,
            sent=load.sent - sent_before,
            not_ok=load.not_ok,
            p50_ms=percentile(window, 0.5),
            p99_ms=percentile(window, 0.99),
            rss_mb=rss_mb(pid),
            fds=open_fds(pid),
            tracked=await tracked(bus.base),
        )
        sent_before, window_start = load.sent, now
        samples.append(sample)
        print(f"{sample.at:6.0f} {sample.sent:8d} {sample.not_ok:6d} {sample.p50_ms:7.2f} "
              f"{sample.p99_ms:7.2f} {sample.rss_mb:7.1f} {sample.fds:5d} {sample.tracked:12d}",
              flush=True)  # fmt: skip
    await running
    print(f"callbacks sent {load.sent} ({load.sent / args.duration:.0f}/s), not OK {load.not_ok}; "
          f"SMSTOWER messages registered {providers.registered}")  # fmt: skip
    return samples


def verdict(samples: list[Sample], rate: float) -> list[str]:
    """What looks like a leak (or a failure) in the samples; empty when nothing does."""
    problems = []
    settled = samples[max(1, len(samples) // 4) :]
    if len(settled) < 2:
        return ["too few samples after the warm-up; run longer"]
    minutes = [s.at / 60 for s in settled]
    rss = [s.rss_mb for s in settled]
    slope = statistics.linear_regression(minutes, rss).slope
    growth = rss[-1] - min(rss)
    print(f"after the warm-up: RSS {rss[0]:.1f} -> {rss[-1]:.1f} MB ({slope:+.2f} MB/min), "
          f"fds {settled[0].fds} -> {settled[-1].fds}, "
          f"p99 {settled[0].p99_ms:.2f} -> {settled[-1].p99_ms:.2f} ms")  # fmt: skip
    if slope > MB_PER_MIN and growth > max(16.0, 0.1 * rss[0]):
        problems.append(f"RSS climbs {slope:.2f} MB/min ({growth:.1f} MB since the warm-up)")
    if settled[-1].fds - settled[0].fds > 10:
        problems.append(f"open descriptors grew from {settled[0].fds} to {settled[-1].fds}")
    if settled[-1].p99_ms > max(3 * settled[0].p99_ms, 50.0):
        problems.append(f"p99 grew from {settled[0].p99_ms:.2f} to {settled[-1].p99_ms:.2f} ms")
    if samples[-1].not_ok:
        problems.append(f"{samples[-1].not_ok} callbacks not answered OK")
    short = [s for s in samples[1:] if s.sent < 0.9 * rate * s.seconds]
    if short:
        problems.append(f"the load fell short of {rate:g}/s in {len(short)} windows")
    return problems


def main() -> int:
    ci = bool(os.environ.get("CI"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0 if ci else 600.0)
    parser.add_argument("--every", type=float, default=10.0 if ci else 30.0)
    parser.add_argument("--rate", type=float, default=500.0)
    args = parser.parse_args()
    print(
        f"soak: {args.duration:g} s at {args.rate:g} callbacks/s, a sample every {args.every:g} s"
    )

    root = Path(tempfile.mkdtemp(prefix="smsbus-soak-"))
    nats_server = NatsServer(root / "nats").start()
    tower = FakeSmstower()
    try:
        with Served(tower.app) as served:
            env = {
                "SMSBUS_NATS_URL": nats_server.url,
                "SMSBUS_LOG_FORMAT": "json",
                "SMSBUS_SMSTOWER_URL": served.url,
                "SMSBUS_SMSTOWER_LOGIN": tower.login,
                "SMSBUS_SMSTOWER_PASSWORD": tower.password,
                "SMSBUS_SMSTOWER_INTERVAL": "1",
                "SMSBUS_SMSTOWER_MAX_INTERVAL": "2",
                "SMSBUS_BALANCE_INTERVAL": "5",
            }
            bus = Smsbus(env, root / "bus").start()
            try:
                samples = asyncio.run(soak(bus, tower, args))
            finally:
                bus.stop()
    finally:
        nats_server.stop()
    problems = verdict(samples, args.rate)
    for problem in problems:
        print(f"LEAK? {problem}")
    print(f"result: {'FAIL' if problems else 'PASS'}")
    if problems:
        print(f"the server's store and the replica's spool and log kept for a look: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
