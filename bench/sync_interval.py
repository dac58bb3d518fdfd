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
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from callback import Smsbus, wrk  # noqa: E402

from tests.support import NatsServer  # noqa: E402


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
                config = f"jetstream {{ sync_interval: {sync} }}\n" if sync else ""
                store = Path(tempfile.mkdtemp(prefix="nats-", dir=workdir))
                nats = NatsServer(store, config=config).start()
                try:
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
