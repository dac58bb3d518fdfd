"""Poller benchmark: prints figures, asserts nothing. Loopback only; stops by itself.

N tracked SMSTOWER messages (default 100,000) against the fake SMSTOWER of the test suite (a real
HTTP app on loopback, answering every id as delivered), with one `smsbus serve` on a real
nats-server. Prints the requests of the first poll cycle (target exactly N/100), the cycle's
duration (target <= 30 s), smsbus's peak RSS (target <= 300 MB) and status events per second into
the stream.

    .venv/bin/python bench/poll.py [--messages 100000] [--interval 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import nats
from procfs import peak_rss_mb, rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.server import Served  # noqa: E402
from tests.fakes.smstower import FakeSmstower, msk_now  # noqa: E402
from tests.support import NatsServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


async def stored(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("SMS", subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--interval", type=float, default=60.0, help="SMSBUS_SMSTOWER_INTERVAL")
    args = parser.parse_args()
    n = args.messages

    with tempfile.TemporaryDirectory(prefix="smsbus-poll-") as work:
        workdir = Path(work)
        nats_server = NatsServer(workdir / "nats").start()
        tower = FakeSmstower()
        base_id = random.randrange(10**9, 10**10)
        ids = [str(base_id + i) for i in range(n)]
        date = msk_now()
        for message_id in ids:
            tower.statuses[message_id] = ("delivered", date)
        with Served(tower.app) as served:
            port, api_port = free_port(), free_port()
            env = {
                **os.environ,
                "SMSBUS_NATS_URL": nats_server.url,
                "SMSBUS_DATA_DIR": str(workdir / "bus"),
                "SMSBUS_HTTP_PORT": str(port),
                "SMSBUS_API_PORT": str(api_port),
                "SMSBUS_LOG_FORMAT": "json",
                "SMSBUS_SMSTOWER_URL": served.url,
                "SMSBUS_SMSTOWER_LOGIN": tower.login,
                "SMSBUS_SMSTOWER_PASSWORD": tower.password,
                "SMSBUS_SMSTOWER_INTERVAL": str(args.interval),
                "SMSBUS_BALANCE_INTERVAL": "86400",
            }
            with (workdir / "smsbus.log").open("ab") as log:
                proc = subprocess.Popen([str(BIN / "smsbus"), "serve"], env=env, stdout=log,
                                        stderr=log)  # fmt: skip
            base, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{api_port}"
            try:
                _run(base, api, proc, nats_server, tower, ids, args.interval)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        nats_server.stop()


def _run(
    base: str,
    api: str,
    proc: subprocess.Popen[bytes],
    nats_server: NatsServer,
    tower: FakeSmstower,
    ids: list[str],
    interval: float,
) -> None:
    n = len(ids)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    print(
        f"machine: {os.cpu_count()} cores; {n} tracked SMSTOWER messages; interval {interval:g} s"
    )

    started = time.monotonic()
    with httpx.Client(base_url=api, timeout=60) as client:
        for i in range(0, n, 1000):
            chunk = [{"provider": "smstower", "message_id": m} for m in ids[i : i + 1000]]
            response = client.post("/v1/messages", json=chunk)
            assert response.status_code == 202, response.text
    registered = time.monotonic() - started
    print(
        f"registered {n} in {registered:.1f} s ({n / registered:.0f}/s through POST /v1/messages)"
    )

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    subject = "sms.status.smstower.>"
    wait_until = time.monotonic() + interval + 300
    first_event = None
    samples: list[tuple[float, int]] = []
    while time.monotonic() < wait_until:
        count = asyncio.run(stored(nats_server.url, subject))
        now = time.monotonic()
        samples.append((now, count))
        if count and first_event is None:
            first_event = now
        if count >= n:
            break
        time.sleep(0.5)
    stop.set()
    sampler.join()

    polls = tower.seen("/getstatus.v2.php")
    asked = [len(r.form["messageid"].split(",")) for r in polls]
    cycle = polls[-1].at - polls[0].at if polls else float("nan")
    print(f"first cycle: {len(polls)} requests (target exactly {n // 100}); "
          f"ids per request: min {min(asked)}, max {max(asked)}; "
          f"{sum(asked)} ids asked for {n} tracked")  # fmt: skip
    print(f"cycle time, first to last request: {cycle:.1f} s   target <= 30 s")
    done = samples[-1][1]
    if first_event is not None and done:
        span = samples[-1][0] - first_event
        print(f"status events stored: {done} in {span:.1f} s after the first "
              f"({done / max(span, 0.5):.0f} events/s into the stream)")  # fmt: skip
    high = peak_rss_mb(proc.pid)
    print(f"smsbus RSS: peak {max(peak[0], high):.0f} MB (kernel high-water {high:.0f} MB), "
          f"now {rss_mb(proc.pid):.0f} MB   target <= 300 MB")  # fmt: skip


if __name__ == "__main__":
    main()
