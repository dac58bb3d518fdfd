"""Callback route benchmark: prints figures, asserts nothing. Loopback only; stops by itself.

In one invocation, under the same wrk load (32 connections, unique server_ids, one uvicorn worker
each), rounds of (each round in another order; the ratios are taken within a round, and their
median is the figure, since a 2-core machine shared with wrk and nats-server moves the rate of
the same code by a third from one run to the next):
  - bare:   a Starlette route that only answers OK (bench/bare_app.py)
  - naive:  a Starlette route awaiting `js.publish` per callback (bench/naive_app.py), what a user
            would write by hand, publishing to smsbus's embedded nats-server
  - smsbus: `smsbus serve`, each answer after a real JetStream ack (embedded nats-server)
then callback-to-subscriber latency at a steady 1,000 callbacks/s, the time from start to
/readyz 200, and idle RSS. Only ratios between runs on the same machine mean much.

    .venv/bin/python bench/callback.py [--duration 8] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
from procfs import children, cpu_seconds, rss_mb

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LUA = HERE / "unique_callbacks.lua"
PATH = "/callbacks/smspilot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"{url} not ready in {timeout} s")


class Smsbus:
    def __init__(self, workdir: Path, **env: str) -> None:
        self.http_port = free_port()
        self.nats_port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix="smsbus-bench-", dir=workdir))
        self.env = {
            **os.environ,
            "SMSBUS_DATA_DIR": str(self.data),
            "SMSBUS_HTTP_PORT": str(self.http_port),
            "SMSBUS_API_PORT": str(free_port()),
            "SMSBUS_EMBEDDED_NATS_PORT": str(self.nats_port),
            "SMSBUS_LOG_FORMAT": "json",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> float:
        log = (self.data / "smsbus.log").open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "smsbus"), "serve"], env=self.env, stdout=log, stderr=log
        )
        log.close()
        return wait_ready(f"{self.base}/readyz", self.proc)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.data, ignore_errors=True)


class Bare:
    """A plain uvicorn app from bench/ (bare_app: only OK; naive_app: a js.publish each)."""

    def __init__(self, module: str = "bare_app", **env: str) -> None:
        self.port = free_port()
        self.module = module
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "python"), "-m", "uvicorn", f"{self.module}:app", "--port", str(self.port),
             "--http", "httptools", "--loop", "uvloop", "--no-access-log", "--log-level",
             "warning", "--no-proxy-headers"],
            cwd=HERE, env=self.env,
        )  # fmt: skip
        wait_ready(f"{self.base}{PATH}?server_id=1&status=2", self.proc)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def wrk(base: str, duration: int, connections: int = 32) -> dict[str, float]:
    id_base = random.randrange(10**11, 10**12)  # unique across runs: dedup never short-cuts
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(LUA),
         base, "--", PATH, str(id_base)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def throughput(duration: int, rounds: int, workdir: Path) -> None:
    print(f"== throughput: wrk -t2 -c32 -d{duration}s, unique server_ids, one worker each; "
          "naive and smsbus share smsbus's embedded nats-server")  # fmt: skip
    print(f"{'run':<12}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'not OK':>8}{'sock err':>9}{'app µs/req':>12}{'busy':>6}"
          f"{'nats µs/req':>13}")  # fmt: skip
    to_bare, to_naive, cpu_to_naive, all_to_naive = [], [], [], []
    runs = ("bare", "naive", "smsbus")
    for n in range(1, rounds + 1):
        # Each round runs the three in another order: whatever the machine does in a given part
        # of a round (and what the runs before leave in the shared nats-server) falls on each.
        order = runs[(n - 1) % 3 :] + runs[: (n - 1) % 3]
        bus = Smsbus(workdir)
        bus.start()
        try:
            results = {}
            assert bus.proc is not None
            nats_pid = children(bus.proc.pid)[0]
            for name in order:
                if name == "smsbus":
                    results[name] = measured(bus.base, duration, bus.proc.pid, nats_pid)
                    continue
                app = Bare(f"{name}_app", NAIVE_NATS_URL=f"nats://127.0.0.1:{bus.nats_port}")
                app.start()
                try:
                    assert app.proc is not None
                    results[name] = measured(app.base, duration, app.proc.pid, nats_pid)
                finally:
                    app.stop()
            published = _metric(bus.base, 'smsbus_callbacks_total{outcome="published"}')
            spooled = _metric(bus.base, 'smsbus_callbacks_total{outcome="spooled"}')
        finally:
            bus.stop()
        for name, r in results.items():
            print(f"{name + f' #{n}':<12}{r['rate']:>10.0f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
                  f"{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}{r['not_ok']:>8}"
                  f"{r['socket_errors']:>9}{r['app_us']:>12.1f}{r['busy']:>6.2f}"
                  f"{r['nats_us']:>13.1f}")  # fmt: skip
        to_bare.append(results["smsbus"]["rate"] / results["bare"]["rate"])
        to_naive.append(results["smsbus"]["rate"] / results["naive"]["rate"])
        cpu_to_naive.append(results["naive"]["app_us"] / results["smsbus"]["app_us"])
        both = {k: results[k]["app_us"] + results[k]["nats_us"] for k in ("naive", "smsbus")}
        all_to_naive.append(both["naive"] / both["smsbus"])
        print(f"  round {n}: smsbus/bare = {to_bare[-1]:.2f}, smsbus/naive = {to_naive[-1]:.2f}; "
              f"CPU per callback naive/smsbus = {cpu_to_naive[-1]:.2f}, with nats-server's "
              f"{all_to_naive[-1]:.2f}; smsbus acked by JetStream {published:.0f}, spooled "
              f"{spooled:.0f}")  # fmt: skip
    bare, naive = statistics.median(to_bare), statistics.median(to_naive)
    print(f"median of {rounds}: smsbus/bare {bare:.2f}, smsbus/naive {naive:.2f}"
          f" (rounds {min(to_naive):.2f} to {max(to_naive):.2f}; CPU per callback naive/smsbus"
          f" {statistics.median(cpu_to_naive):.2f}, with nats-server's"
          f" {statistics.median(all_to_naive):.2f})   target smsbus/naive >= 1.0")  # fmt: skip


def measured(base: str, duration: int, app_pid: int, nats_pid: int) -> dict[str, float]:
    """wrk against `base`, with the CPU the app's process and nats-server used per request, and
    the share of a core the app kept busy (1.0: it had work all the time)."""
    app, nats_server = cpu_seconds(app_pid), cpu_seconds(nats_pid)
    result = wrk(base, duration)
    app, nats_server = cpu_seconds(app_pid) - app, cpu_seconds(nats_pid) - nats_server
    done = max(result["requests"], 1)
    result["app_us"] = app / done * 1e6
    result["nats_us"] = nats_server / done * 1e6
    result["busy"] = app / (result["duration_us"] / 1e6)
    return result


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


async def _latency(base: str, nats_url: str, rate: int, seconds: float) -> list[float]:
    """Send callbacks at a steady rate over keep-alive connections; a NATS subscriber notes
    when each event arrives. Latency = arrival - send, both on this machine's clock."""
    sent: dict[str, int] = {}
    arrived: dict[str, int] = {}
    nc = await nats.connect(nats_url)

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        now = time.perf_counter_ns()
        arrived[json.loads(msg.data)["subject"]] = now

    await nc.subscribe("sms.status.smspilot.>", cb=on_event)
    await nc.flush()
    host, port = base.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(16)]
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for c in connections:
        free.put_nowait(c)
    not_ok = 0

    async def one(server_id: str) -> None:
        nonlocal not_ok
        reader, writer = await free.get()
        request = f"GET {PATH}?server_id={server_id}&status=2 HTTP/1.1\r\nHost: b\r\n\r\n"
        sent[server_id] = time.perf_counter_ns()
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200") or body != b"OK":
            not_ok += 1
        free.put_nowait((reader, writer))

    base_id = random.randrange(10**11, 10**12)
    total = int(rate * seconds)
    start = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(str(base_id + i))))
    await asyncio.gather(*tasks)
    deadline = time.perf_counter() + 5
    while len(arrived) < total and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - start
    await nc.close()
    for _, writer in connections:
        writer.close()
    missing = total - len(arrived)
    print(f"  sent {total} at {total / elapsed:.0f}/s; not OK {not_ok}; missing events {missing}")
    return sorted((arrived[k] - sent[k]) / 1e6 for k in arrived if k in sent)


def latency(workdir: Path, rate: int = 1000, seconds: float = 8) -> None:
    print(f"== callback-to-subscriber latency at {rate} callbacks/s for {seconds:g} s")
    bus = Smsbus(workdir)
    bus.start()
    try:
        samples = asyncio.run(_latency(bus.base, f"nats://127.0.0.1:{bus.nats_port}", rate,
                                       seconds))  # fmt: skip
    finally:
        bus.stop()
    p50 = samples[len(samples) // 2]
    p99 = samples[int(len(samples) * 0.99)]
    print(f"  p50 {p50:.2f} ms (target 2)   p99 {p99:.2f} ms (target 10)   max {samples[-1]:.2f}")


def startup(workdir: Path, runs: int = 3) -> None:
    print(f"== start to /readyz 200 with the embedded nats-server (fresh data dir), {runs} runs")
    times, rss_bus, rss_nats = [], [], []
    for _ in range(runs):
        bus = Smsbus(workdir)
        times.append(bus.start())
        time.sleep(3)  # idle
        assert bus.proc is not None
        rss_bus.append(rss_mb(bus.proc.pid))
        rss_nats.append(sum(rss_mb(pid) for pid in children(bus.proc.pid)))
        bus.stop()
    print(f"  {' '.join(f'{t:.2f}' for t in times)} s; median {statistics.median(times):.2f} s"
          f"   target <= 2 s")  # fmt: skip
    print(f"== idle RSS: smsbus {statistics.median(rss_bus):.1f} MB   target <= 100 MB;"
          f" its embedded nats-server {statistics.median(rss_nats):.1f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="rounds of bare, naive and smsbus, each in another order",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="smsbus-bench-") as work:
        workdir = Path(work)
        print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
        throughput(args.duration, args.rounds, workdir)
        latency(workdir)
        startup(workdir)


if __name__ == "__main__":
    main()
