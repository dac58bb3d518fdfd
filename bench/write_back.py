"""Write-back benchmark: prints figures, asserts nothing. Loopback only; stops by itself.

N tracked SMSTOWER messages (default 200,000), registered through `POST /v1/messages` with phone
and client_ref, held by two `smsbus serve` replicas on one nats-server (the fake SMSTOWER of the
test suite answering every id as still on its way, polled once an hour so that polls stay out of
the way). Then the server is stopped, its store deleted and the server started again on nothing,
as a NATS container without a volume restarts. Prints, for each replica, how long after the
server's start its `states written back` line came and how many states it wrote back, its RSS
before the loss and at its peak after it; then when the new bucket held every message, and when
each replica tracked every one again (`smsbus_tracked_messages`, once it has written back; a
sample every 0.2 s).

    .venv/bin/python bench/write_back.py [--messages 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import nats
from poll import Serve, register, smstower_env, smstower_with
from procfs import rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes.server import Served  # noqa: E402
from tests.support import NatsServer  # noqa: E402

BUCKET = "KV_SMS_messages"


async def keys(url: str) -> int:
    """Messages in the state bucket's stream (one per key: nothing is written twice here)."""
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        return int((await nc.jetstream(timeout=5).stream_info(BUCKET)).state.messages)
    except nats.errors.Error:
        return 0
    finally:
        await nc.close()


def written_back(bus: Serve) -> dict[str, object] | None:
    for line in bus.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "states written back":
            return dict(entry)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    n = parser.parse_args().messages
    print(f"machine: {os.cpu_count()} cores; {n} tracked SMSTOWER messages, two replicas")
    with tempfile.TemporaryDirectory(prefix="smsbus-write-back-") as work:
        workdir = Path(work)
        server = NatsServer(workdir / "nats").start()
        tower, ids = smstower_with(n, "processing")
        buses: list[Serve] = []
        with Served(tower.app) as served:
            try:
                for name in ("a", "b"):
                    (workdir / name).mkdir()
                    env = smstower_env(workdir / name, server, served.url, tower)
                    env["SMSBUS_SMSTOWER_INTERVAL"] = env["SMSBUS_SMSTOWER_MAX_INTERVAL"] = "3600"
                    buses.append(Serve(env, workdir / name).__enter__())
                started = time.monotonic()
                register(buses[0], ids)
                print(f"registered {n} in {time.monotonic() - started:.1f} s")
                while min(bus.tracked() for bus in buses) < n:
                    time.sleep(0.1)
                before = [rss_mb(bus.proc.pid) for bus in buses]
                peaks = list(before)
                stop = threading.Event()

                def sample() -> None:
                    while not stop.is_set():
                        for i, bus in enumerate(buses):
                            peaks[i] = max(peaks[i], rss_mb(bus.proc.pid))
                        time.sleep(0.2)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                server.stop()
                shutil.rmtree(server.store_dir / "jetstream")
                server.start()
                lost = time.monotonic()
                print("== the server started again on an empty store")
                held_at: float | None = None
                tracked_at: list[float | None] = [None, None]
                lines: list[dict[str, object] | None] = [None, None]
                deadline = lost + 600
                while time.monotonic() < deadline and (
                    held_at is None or None in tracked_at or None in lines
                ):
                    now = time.monotonic() - lost
                    if held_at is None and asyncio.run(keys(server.url)) >= n:
                        held_at = now
                    for i, bus in enumerate(buses):
                        if lines[i] is None and (line := written_back(bus)) is not None:
                            lines[i] = line | {"seen_s": now}
                        # (before its mirror sees the new bucket, the gauge still counts all)
                        if lines[i] is not None and tracked_at[i] is None and bus.tracked() >= n:
                            tracked_at[i] = now
                    time.sleep(0.2)
                stop.set()
                sampler.join()
                for i, name in enumerate(("a", "b")):
                    line = lines[i] or {}
                    print(f"replica {name}: `states written back` at {line.get('seen_s', 0):.1f} s "
                          f"({line.get('states')} states, {line.get('seconds')} s by its own "
                          f"clock from the loss it saw); tracking all {n} again at "
                          f"{tracked_at[i] or float('nan'):.1f} s; RSS {before[i]:.0f} MB "
                          f"before, {peaks[i]:.0f} MB at its peak")  # fmt: skip
                print(f"the new bucket held all {n} at {held_at or float('nan'):.1f} s")
            finally:
                for bus in buses:
                    bus.__exit__()
                server.stop()


if __name__ == "__main__":
    main()
