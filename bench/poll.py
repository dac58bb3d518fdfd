"""Poller benchmark: prints figures, asserts nothing. Loopback only; stops by itself.

N tracked SMSTOWER messages (default 100,000; several sizes side by side with
`--messages 100000,1000000`) against the fake SMSTOWER of the test suite (a real HTTP app on
loopback, answering every id as still on its way, so every message stays open), with one
`smsbus serve` on a real nats-server. For each size: registration through `POST /v1/messages`
(with phone and client_ref), the first poll cycle (requests, target exactly N/100; ids per
request; cycle time, first to last request), status events per second into the stream, smsbus's
RSS with every message registered and at its peak; then a restart onto the same bucket with every
message open and due: time to /readyz, until every message is scheduled, until the first poll,
and one pass over all of them at full pace, each now answered delivered (requests, duration).
Callbacks are measured on the same process three times (wrk, 10 s, unique server_ids, as in
bench/callback.py): idle before any registration, idle again with every message registered
(before the first poll, which comes an interval after registration), during the first cycle
(from its first event), and while it polls every open message at full pace after the restart;
the ratios to the idle rate with every message registered are printed.

    .venv/bin/python bench/poll.py [--messages 100000[,1000000]] [--interval 60]

With `--provider smsc`: an SMSC account with N SMS sent over the last 2.9 days, in the fake
SMSC's history (100 rows a page, paged by global id), every one `sent`; once smsbus has read them
all, the statuses of 1,000 spread over the window change to delivered, and the script times how
long each change takes to reach the stream (target: each within SMSBUS_SMSC_MAX_INTERVAL), with
SMSC requests a minute and smsbus's RSS.

    .venv/bin/python bench/poll.py --provider smsc [--messages 100000] [--interval 60]
                                   [--max-interval 600]
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
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import nats
import orjson
from callback import wrk
from nats.js.api import DeliverPolicy
from procfs import peak_rss_mb, rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.server import Served  # noqa: E402
from tests.fakes.smsc import KYIV, FakeSmsc  # noqa: E402
from tests.fakes.smstower import FakeSmstower, Seen, msk_now  # noqa: E402
from tests.support import NatsServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def wait_ready(
    base: str, within: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"smsbus exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"smsbus not ready within {within:g} s")


async def stored(url: str, subject: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("SMS", subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--messages", default="100000", help="how many; several, comma-separated, side by side"
    )
    parser.add_argument("--interval", type=float, default=60.0, help="SMSBUS_<P>_INTERVAL")
    parser.add_argument("--max-interval", type=float, default=600.0, help="SMSBUS_<P>_MAX_INTERVAL")
    parser.add_argument("--provider", choices=["smstower", "smsc"], default="smstower")
    args = parser.parse_args()
    sizes = [int(n) for n in args.messages.split(",")]
    if args.provider == "smsc":
        args.messages = sizes[0]
        smsc_main(args)
        return
    print(
        f"machine: {os.cpu_count()} cores; tracked SMSTOWER messages, interval {args.interval:g} s"
    )
    runs = [smstower_run(n, args.interval) for n in sizes]
    if len(runs) > 1:
        print("\nside by side")
        for name, _ in runs[0]:
            cells = "".join(f"{dict(run)[name]:>14}" for run in runs)
            print(f"  {name:<34}{cells}")
        cycles = [float(dict(run)["cycle s"]) for run in runs]
        print(f"  cycle({sizes[-1]}) / cycle({sizes[0]}): {cycles[-1] / cycles[0]:.1f} "
              f"for {sizes[-1] / sizes[0]:g} times the messages")  # fmt: skip


def smstower_run(n: int, interval: float) -> list[tuple[str, str]]:
    """One run with n tracked messages: register, the first cycle, a restart. Prints as it goes
    and returns the figures by name."""
    figures: list[tuple[str, str]] = [("messages", str(n))]
    with tempfile.TemporaryDirectory(prefix="smsbus-poll-") as work:
        workdir = Path(work)
        nats_server = NatsServer(workdir / "nats").start()
        tower, ids = smstower_with(n, "processing")  # still on its way: every message stays open
        with Served(tower.app) as served:
            env = smstower_env(workdir, nats_server, served.url, tower)
            env["SMSBUS_SMSTOWER_INTERVAL"] = str(interval)
            with Serve(env, workdir) as bus:
                print(f"== {n} tracked messages")
                _callbacks(bus, "idle, nothing registered")
                cycle_figures, idle = _first_cycle(bus, nats_server, tower, ids, interval)
                figures += cycle_figures
            # The same bucket, every message open and due at once: the way to a first poll, then
            # one pass over all of them at full pace, each answered delivered (one event each).
            fast = env | {"SMSBUS_SMSTOWER_INTERVAL": "1", "SMSBUS_SMSTOWER_MAX_INTERVAL": "1"}
            asked_before = len(tower.seen("/getstatus.v2.php"))
            done = msk_now()
            for message_id in ids:
                tower.statuses[message_id] = ("delivered", done)
            with Serve(fast, workdir) as bus:
                figures += _restart(bus, tower, n, asked_before)
                busy = _callbacks(bus, f"while polling {n} open messages at full pace")
                figures += _full_pace(bus, nats_server, tower, n, asked_before)
            cycle = dict(figures)
            figures += [
                ("callbacks idle, registered /s", f"{idle['rate']:.0f}"),
                (
                    "callbacks cycle/idle",
                    f"{float(cycle['callbacks during cycle /s']) / idle['rate']:.2f}",
                ),
                ("callbacks while polling /s", f"{busy['rate']:.0f}"),
                ("callbacks while polling p99 ms", f"{busy['p99_ms']:.1f}"),
                ("callbacks polling/idle", f"{busy['rate'] / idle['rate']:.2f}"),
            ]
        nats_server.stop()
    return figures


def smstower_with(n: int, status: str) -> tuple[FakeSmstower, list[str]]:
    """A fake SMSTOWER answering `status`, dated now, for each of n new message ids; and the ids."""
    tower = FakeSmstower()
    base_id = random.randrange(10**9, 10**10)
    ids = [str(base_id + i) for i in range(n)]
    date = msk_now()
    for message_id in ids:
        tower.statuses[message_id] = (status, date)
    return tower, ids


def smstower_env(
    workdir: Path, nats_server: NatsServer, url: str, tower: FakeSmstower
) -> dict[str, str]:
    """The environment of `smsbus serve` polling the fake SMSTOWER at `url` (its interval is the
    caller's), with its data directory in `workdir`."""
    return {
        **os.environ,
        "SMSBUS_NATS_URL": nats_server.url,
        "SMSBUS_DATA_DIR": str(workdir / "bus"),
        "SMSBUS_LOG_FORMAT": "json",
        "SMSBUS_SMSTOWER_URL": url,
        "SMSBUS_SMSTOWER_LOGIN": tower.login,
        "SMSBUS_SMSTOWER_PASSWORD": tower.password,
        "SMSBUS_BALANCE_INTERVAL": "86400",
    }


def register(bus: Serve, ids: list[str]) -> None:
    """Track every id as an SMSTOWER message through `POST /v1/messages`, 1,000 a request, each
    with a phone and a client_ref."""
    with httpx.Client(base_url=bus.api, timeout=60) as client:
        for i in range(0, len(ids), 1000):
            chunk = [
                {"provider": "smstower", "message_id": m, "phone": f"7903{m[-7:]}",
                 "client_ref": f"order-{m}"}
                for m in ids[i : i + 1000]
            ]  # fmt: skip
            response = client.post("/v1/messages", json=chunk)
            assert response.status_code == 202, response.text


class Serve:
    """`smsbus serve` on free ports, until /readyz answers 200; SIGTERM on the way out."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        port, api_port = free_port(), free_port()
        self.env = env | {"SMSBUS_HTTP_PORT": str(port), "SMSBUS_API_PORT": str(api_port)}
        self.base, self.api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{api_port}"
        self.log = workdir / "smsbus.log"

    def __enter__(self) -> Serve:
        self.started = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(BIN / "smsbus"), "serve"], env=self.env,
                                         stdout=log, stderr=log)  # fmt: skip
        wait_ready(self.base, within=600, proc=self.proc)
        self.ready = time.monotonic() - self.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)

    def tracked(self) -> int:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('smsbus_tracked_messages{provider="smstower"}'):
                return int(float(line.split()[-1]))
        return 0


def _first_cycle(
    bus: Serve, nats_server: NatsServer, tower: FakeSmstower, ids: list[str], interval: float
) -> tuple[list[tuple[str, str]], dict[str, float]]:
    n = len(ids)
    started = time.monotonic()
    register(bus, ids)
    registered = time.monotonic() - started
    print(f"registered {n} in {registered:.1f} s ({n / registered:.0f}/s through POST "
          f"/v1/messages, with phone and client_ref)")  # fmt: skip
    settled_rss = rss_mb(bus.proc.pid)
    # The reference for the ratios: the same process, every message held, nothing polled yet.
    idle = _callbacks(bus, "idle, every message registered, before the first poll")
    if tower.seen("/getstatus.v2.php"):
        print("  (the first poll came before that ended: a longer --interval keeps it idle)")

    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(bus.proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    subject = "sms.status.smstower.>"
    wait_until = time.monotonic() + interval + 600
    first_event = None
    samples: list[tuple[float, int]] = []
    during: dict[str, float] = {}  # callbacks while the cycle runs, from its first event on
    load = threading.Thread(target=lambda: during.update(wrk(bus.base, 10)), daemon=True)
    while time.monotonic() < wait_until:
        count = asyncio.run(stored(nats_server.url, subject))
        now = time.monotonic()
        samples.append((now, count))
        if count and first_event is None:
            first_event = now
            load.start()
        if count >= n:
            break
        time.sleep(0.5)
    stop.set()
    sampler.join()
    load.join()

    polls = _one_pass(tower, n, after=0)  # the first cycle
    asked = [len(r.form["messageid"].split(",")) for r in polls]
    cycle = polls[-1].at - polls[0].at if polls else float("nan")
    print(f"first cycle: {len(polls)} requests (target exactly {n // 100}); "
          f"ids per request: min {min(asked)}, max {max(asked)}; "
          f"{sum(asked)} ids asked for {n} tracked")  # fmt: skip
    print(f"cycle time, first to last request: {cycle:.1f} s")
    done = samples[-1][1]
    span = samples[-1][0] - first_event if first_event is not None else float("nan")
    rate = done / max(span, 0.5)
    print(f"status events stored: {done} in {span:.1f} s after the first "
          f"({rate:.0f} events/s into the stream)")  # fmt: skip
    print(f"callbacks during the cycle (10 s from its first event): {during['rate']:.0f}/s, "
          f"p50 {during['p50_ms']:.1f} ms, p99 {during['p99_ms']:.1f} ms, "
          f"not OK {during['not_ok']:.0f}")  # fmt: skip
    high = peak_rss_mb(bus.proc.pid)
    peak_mb = max(peak[0], high)
    print(f"smsbus RSS: {settled_rss:.0f} MB with every message registered; peak {peak_mb:.0f} MB "
          f"during the cycle (kernel high-water {high:.0f} MB)")  # fmt: skip
    return [
        ("registered /s", f"{n / registered:.0f}"),
        ("first-cycle requests", str(len(polls))),
        ("ids per request (min)", str(min(asked))),
        ("ids asked", str(sum(asked))),
        ("cycle s", f"{cycle:.1f}"),
        ("events/s", f"{rate:.0f}"),
        ("RSS registered MB", f"{settled_rss:.0f}"),
        ("RSS peak MB", f"{peak_mb:.0f}"),
        ("callbacks during cycle /s", f"{during['rate']:.0f}"),
        ("callbacks during cycle p99 ms", f"{during['p99_ms']:.1f}"),
    ], idle


def _callbacks(bus: Serve, when: str) -> dict[str, float]:
    """wrk against the callback route for 10 s. Each callback's state is written before its OK,
    so nothing is left over for later figures to pay for."""
    result = wrk(bus.base, 10)
    print(f"callbacks {when}: {result['rate']:.0f}/s, p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms, not OK {result['not_ok']:.0f}")  # fmt: skip
    return result


def _restart(bus: Serve, tower: FakeSmstower, n: int, asked_before: int) -> list[tuple[str, str]]:
    while bus.tracked() < n and bus.proc.poll() is None:
        time.sleep(0.2)
    scheduled = time.monotonic() - bus.started
    while len(tower.seen("/getstatus.v2.php")) == asked_before and bus.proc.poll() is None:
        time.sleep(0.05)
    first_poll = time.monotonic() - bus.started
    loaded_rss = rss_mb(bus.proc.pid)
    print(f"restart with {n} open messages in the bucket: /readyz 200 after {bus.ready:.1f} s, "
          f"all {n} scheduled after {scheduled:.1f} s, first poll after {first_poll:.1f} s; "
          f"RSS {loaded_rss:.0f} MB")  # fmt: skip
    return [
        ("restart: first poll s", f"{first_poll:.1f}"),
        ("restart: RSS MB", f"{loaded_rss:.0f}"),
    ]


def _one_pass(tower: FakeSmstower, n: int, after: int) -> list[Seen]:
    """The status requests from the `after`-th on, until every one of n ids was asked once."""
    polls, covered = [], set()
    for request in tower.seen("/getstatus.v2.php")[after:]:
        polls.append(request)
        covered.update(request.form["messageid"].split(","))
        if len(covered) >= n:
            break
    return polls


def _full_pace(
    bus: Serve, nats_server: NatsServer, tower: FakeSmstower, n: int, asked_before: int
) -> list[tuple[str, str]]:
    """Wait for the pass that finds every message delivered; its requests and duration."""
    while asyncio.run(stored(nats_server.url, "sms.status.smstower.>")) < 2 * n:
        if bus.proc.poll() is not None:
            raise SystemExit(f"smsbus exited with {bus.proc.returncode} during the pass")
        time.sleep(0.5)
    polls = _one_pass(tower, n, after=asked_before)
    span = polls[-1].at - polls[0].at
    failed, lost = _lease_trouble(bus.log)
    print(f"full pace after the restart: {n} delivered in {len(polls)} requests over {span:.1f} s "
          f"({n / span:.0f} messages/s, every one an event); lease requests failed in the run: "
          f"{failed}, leases lost: {lost}")  # fmt: skip
    return [("full pace: requests", str(len(polls))), ("full pace: pass s", f"{span:.1f}")]


def _lease_trouble(log: Path) -> tuple[int, int]:
    """Lease requests that failed (not acquired, not renewed) and leases lost, in smsbus's log."""
    failed = lost = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"lease not acquired"' in line or '"lease not renewed"' in line:
            failed += 1
        elif '"lease lost; polling stops here"' in line:
            lost += 1
    return failed, lost


def smsc_main(args: argparse.Namespace) -> None:
    n, changes = args.messages, 1000
    with tempfile.TemporaryDirectory(prefix="smsbus-poll-smsc-") as work:
        workdir = Path(work)
        nats_server = NatsServer(workdir / "nats").start()
        fake = FakeSmsc()
        now = datetime.now(KYIV)
        ids = random.Random(1).sample(range(10**7, 10**8), n)
        for k, message_id in enumerate(ids):  # newest last; spread over 2.9 days
            sent = now - timedelta(hours=69.6 * (1 - k / n))
            fake.send(message_id, [f"380{message_id}"], status=0, sent=sent, sort=False)
        fake.sort()
        with Served(fake.app) as served:
            port, api_port = free_port(), free_port()
            env = {
                **os.environ,
                "SMSBUS_NATS_URL": nats_server.url,
                "SMSBUS_DATA_DIR": str(workdir / "bus"),
                "SMSBUS_HTTP_PORT": str(port),
                "SMSBUS_API_PORT": str(api_port),
                "SMSBUS_LOG_FORMAT": "json",
                "SMSBUS_SMSC_URL": served.url,
                "SMSBUS_SMSC_LOGIN": fake.login,
                "SMSBUS_SMSC_PASSWORD": fake.password,
                "SMSBUS_SMSC_INTERVAL": str(args.interval),
                "SMSBUS_SMSC_MAX_INTERVAL": str(args.max_interval),
            }
            with (workdir / "smsbus.log").open("ab") as log:
                proc = subprocess.Popen([str(BIN / "smsbus"), "serve"], env=env, stdout=log,
                                        stderr=log)  # fmt: skip
            try:
                print(f"machine: {os.cpu_count()} cores; SMSC history of {n} SMS over 2.9 days; "
                      f"interval {args.interval:g} s, max {args.max_interval:g} s")  # fmt: skip
                started = time.monotonic()
                wait_ready(f"http://127.0.0.1:{port}")
                peak = 0.0
                while asyncio.run(stored(nats_server.url, "sms.status.smsc.>")) < n:
                    peak = max(peak, rss_mb(proc.pid))
                    if proc.poll() is not None:
                        raise SystemExit("smsbus exited")
                    time.sleep(1)
                print(f"first read of the whole history: {time.monotonic() - started:.0f} s")
                # 1,000 changes spread over the window, from the newest to the oldest rows.
                changed_at = time.monotonic()
                chosen = ids[:: n // changes][:changes]
                for message_id in chosen:
                    fake.change(message_id, f"380{message_id}", 1)
                seen: dict[str, float] = {}
                deadline = changed_at + 3 * args.max_interval
                while len(seen) < len(chosen) and time.monotonic() < deadline:
                    for subject in asyncio.run(delivered(nats_server.url)):
                        seen.setdefault(subject, time.monotonic())
                    peak = max(peak, rss_mb(proc.pid))
                    time.sleep(2)
                delays = sorted(seen[str(m)] - changed_at for m in chosen if str(m) in seen)
                window = [t for t in fake.times if t >= changed_at]
                minutes = max((window[-1] - window[0]) / 60, 1 / 60) if window else 1
                print(f"changes seen: {len(delays)} of {len(chosen)}; time to see them: median "
                      f"{delays[len(delays) // 2]:.0f} s, max {delays[-1]:.0f} s "
                      f"(target each <= {args.max_interval:g} s)")  # fmt: skip
                print(f"SMSC requests: {len(window) / minutes:.0f} a minute; refused "
                      f"{fake.refused}")  # fmt: skip
                high = peak_rss_mb(proc.pid)
                print(f"smsbus RSS: peak {max(peak, high):.0f} MB, now {rss_mb(proc.pid):.0f} MB")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        nats_server.stop()


async def delivered(url: str) -> set[str]:
    """The message ids with a delivered event in the stream."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("SMS", subjects_filter="sms.status.smsc.delivered")
        if not (info.state.subjects or {}):
            return set()
        sub = await nc.jetstream().subscribe(
            "sms.status.smsc.delivered", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        found: set[str] = set()
        total = sum((info.state.subjects or {}).values())
        for _ in range(total):
            msg = await sub.next_msg(timeout=5)
            found.add(orjson.loads(msg.data)["subject"])
        await sub.unsubscribe()
        return found
    finally:
        await nc.close()


if __name__ == "__main__":
    main()
