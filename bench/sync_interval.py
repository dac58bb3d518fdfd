"""JetStream's sync interval against the callback rate: prints figures, asserts nothing.

nats-server acknowledges a publish once the message is written to its file store, and flushes
the store to disk every `sync_interval` (2 minutes by default). With `sync_interval: always` it
fsyncs every write before the ack. In one invocation, alternating rounds of the same wrk load
(bench/callback.py's: 32 connections, unique server_ids) against `smsbus serve` on a nats-server
configured each way.

    .venv/bin/python bench/sync_interval.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from callback import Smsbus, wrk  # noqa: E402

from bus.nats_server import binary  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402


class Nats:
    def __init__(self, workdir: Path, sync: str | None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="nats-", dir=workdir))
        setting = f"  sync_interval: {sync}\n" if sync else ""
        self.config = self.dir / "nats.conf"
        self.config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{self.dir / "js"}"\n{setting}}}\n'
        )
        self.proc = subprocess.Popen(
            [str(binary()), "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"nats-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                return s.recv(5) == b"INFO "
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="smsbus-sync-"))
    print(f"== callback rate by JetStream sync_interval: wrk -t2 -c32 -d{args.duration}s")
    print(f"{'run':<22}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'not OK':>8}")
    rates: dict[str, list[float]] = {"default (2m)": [], "always": []}
    try:
        for n in range(1, args.rounds + 1):
            for label, sync in (("default (2m)", None), ("always", "always")):
                nats = Nats(workdir, sync)
                try:
                    wait_for(nats.ready, what="nats-server")
                    bus = Smsbus(workdir, SMSBUS_NATS_URL=nats.url)
                    bus.start()
                    try:
                        r = wrk(bus.base, args.duration)
                    finally:
                        bus.stop()
                finally:
                    nats.stop()
                rates[label].append(r["rate"])
                print(f"{label + f' #{n}':<22}{r['rate']:>8.0f}{r['p50_ms']:>9.2f}"
                      f"{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}{r['not_ok']:>8}")  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    default, always = (statistics.median(v) for v in rates.values())
    print(
        f"median req/s: default {default:.0f}, always {always:.0f}; "
        f"always/default = {always / default:.2f}"
    )


if __name__ == "__main__":
    main()
