"""A callback now and then while smsbus polls at full pace: prints figures, asserts nothing.

`bench/poll.py` measures callbacks under wrk, a crowd: polls give way to crowds (bus.pace). This
measures the other case, the usual one for a sender's callbacks: one at a time, a few dozen a
second, each sent when the one before was answered, while a poller works through every open
message at full pace (the pass after a restart, or after an outage, when all of them are due at
once). N SMSTOWER messages are registered through `POST /v1/messages`, the latency of callbacks
one at a time is measured on that process (idle: nothing is due), then smsbus restarts onto the
same bucket with every message due and answered delivered, and callbacks one at a time go on
from the first poll until the pass has stored every event. Loopback only; stops by itself.

    .venv/bin/python bench/pass_latency.py [--messages 100000] [--rate 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from poll import Serve, register, smstower_env, smstower_with, stored

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.server import Served  # noqa: E402
from tests.support import NatsServer  # noqa: E402


class OneAtATime:
    """Callbacks for unique server_ids, one at a time, at most `rate` a second, until stopped:
    each one's latency in ms, and any answer that was not `OK`."""

    def __init__(self, base: str, rate: float) -> None:
        self._base, self._gap = base, 1 / rate
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.not_ok = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        first = random.randrange(10**11, 10**12)
        with httpx.Client(base_url=self._base, timeout=30) as client:
            client.get("/healthz")  # the connection is open before the first one is timed
            due = time.monotonic()
            for n in range(first, first + 10**9):
                if self._stop.is_set():
                    return
                due += self._gap
                started = time.perf_counter()
                response = client.get("/callbacks/smspilot", params={"server_id": n, "status": 2})
                self.latencies.append((time.perf_counter() - started) * 1000)
                self.not_ok += response.text != "OK"
                time.sleep(max(0.0, due - time.monotonic()))

    def __enter__(self) -> OneAtATime:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, seconds: float) -> str:
        ms = sorted(self.latencies)
        if not ms:
            return "no callback answered"

        def at(q: float) -> float:
            return ms[min(len(ms) - 1, int(q * len(ms)))]

        return (
            f"{len(ms)} in {seconds:.1f} s ({len(ms) / seconds:.0f}/s), p50 {at(0.5):.1f} ms, "
            f"p90 {at(0.9):.1f}, p99 {at(0.99):.1f}, max {ms[-1]:.1f}, not OK {self.not_ok}"
        )


def one_round(n: int, rate: float) -> None:
    with tempfile.TemporaryDirectory(prefix="smsbus-pass-") as work:
        workdir = Path(work)
        nats_server = NatsServer(workdir / "nats").start()
        tower, ids = smstower_with(n, "delivered")
        with Served(tower.app) as served:
            env = smstower_env(workdir, nats_server, served.url, tower)
            slow = {"SMSBUS_SMSTOWER_INTERVAL": "3600", "SMSBUS_SMSTOWER_MAX_INTERVAL": "3600"}
            with Serve(env | slow, workdir) as bus:
                register(bus, ids)
                with OneAtATime(bus.base, rate) as idle:
                    time.sleep(5)
                print(f"  idle, {n} registered, nothing due:  {idle.summary(5)}")
            fast = {"SMSBUS_SMSTOWER_INTERVAL": "1", "SMSBUS_SMSTOWER_MAX_INTERVAL": "1"}
            with Serve(env | fast, workdir) as bus:
                while not tower.seen("/getstatus.v2.php"):
                    if bus.proc.poll() is not None:
                        raise SystemExit(f"smsbus exited with {bus.proc.returncode}")
                    time.sleep(0.02)
                started = time.monotonic()
                with OneAtATime(bus.base, rate) as busy:
                    while asyncio.run(stored(nats_server.url, "sms.status.smstower.>")) < n:
                        if bus.proc.poll() is not None:
                            raise SystemExit(f"smsbus exited with {bus.proc.returncode}")
                        time.sleep(0.2)
                took = time.monotonic() - started
                print(f"  during the full-pace pass ({took:.1f} s): {busy.summary(took)}")
        nats_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=50.0, help="callbacks a second, at most")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; {args.messages} open SMSTOWER messages, callbacks one "
          f"at a time, at most {args.rate:.0f} a second")  # fmt: skip
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}")
        one_round(args.messages, args.rate)


if __name__ == "__main__":
    main()
