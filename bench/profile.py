"""Where a callback's CPU goes: smsbus's process sampled with py-spy and its embedded nats-server
with perf, under the load of bench/callback.py (wrk -t2 -c32, unique server_ids), then the same
for the hand-written route (bench/naive_app.py) on the same nats-server. Prints µs of CPU per
callback by part, side by side. Loopback only; stops by itself; prints figures, asserts nothing.
Sampling costs CPU on the machine that runs the load, so the rates printed here are lower than
bench/callback.py's and their ratio means nothing; the parts are what this script is for.

py-spy comes with `make profile`; perf is Debian's linux-perf, and it must be allowed to sample
another process (root, or kernel.perf_event_paranoid <= 1). A side that cannot be sampled is
named, with why, and left out.

    .venv/bin/python bench/profile.py [--duration 8]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from callback import BIN, Bare, Smsbus, measured, wrk
from procfs import children

PY_SPY_HZ = 250
PERF_HZ = 999

# (label, does a py-spy frame belong to it). A sample counts once for each part one of its
# frames belongs to, so a part is inclusive of what it calls; the parts overlap where one
# calls another, and the indented ones are inside the one above them.
Frame = Callable[[str], bool]


def _in(func: str) -> Frame:
    return lambda frame: frame.startswith(func + " (")


APP_PARTS: list[tuple[str, Frame]] = [
    ("HTTP: request read and parsed (uvicorn, httptools)", _in("HttpToolsProtocol.data_received")),
    (
        "the app, its answer included (naive: Starlette, the route)",
        lambda f: any(p in f for p in ("(receiver/", "(starlette/", "(naive_app.py")),
    ),
    ("  the answer written (one write; naive: two)", _in("RequestResponseCycle.send")),
    ("  parsing the callback", lambda f: f.startswith(("parse_pairs (", "parse_callback ("))),
    ("  the state's look-up (mirror, bucket)", _in("States.find")),
    ("  building the CloudEvent", _in("status_event")),
    ("  the summary line", _in("info_line")),
    ("metrics (prometheus-client)", lambda f: "prometheus_client" in f),
    ("NATS: answers and deliveries read (nats-py)", _in("Client._read_loop")),
    ("NATS: writes (nats-py's flusher)", _in("Client._flusher")),
    ("group commit of events (bus/group.py)", _in("GroupCommit._send")),
    ("state writes (bus/projection.py, bus/state.py)", _in("Projection._apply")),
    ("bucket reads (batched direct gets)", _in("States._read_batch")),
]
LOOP_SELF = "event loop itself (uvloop: polling, socket reads)"

# (label, symbol suffix) in perf's inclusive report of nats-server.
NATS_PARTS = [
    ("storing (the stream's inbound loop)", "(*stream).internalLoop"),
    ("  fast batch's path", "(*stream).processJetStreamFastBatchMsg"),
    ("  a message's store path", "(*stream).processJetStreamMsgWithBatch"),
    ("  file store's write", "(*fileStore).StoreMsg"),
    ("    the write to the block file (pwrite)", "(*msgBlock).flushPendingMsgsLocked"),
    ("reading what clients send", "(*client).readLoop"),
    ("  the bucket's direct gets", "(*stream).processDirectGetRequest"),
    ("writing to clients (acks, deliveries)", "(*client).writeLoop"),
    ("the watch's consumer", "(*consumer).loopAndGatherMsgs"),
    ("Go runtime: sysmon", "runtime.sysmon"),
    ("Go runtime: garbage collection", "runtime.gcBgMarkWorker"),
]


def py_spy() -> str | None:
    found = BIN / "py-spy"
    return str(found) if found.exists() else shutil.which("py-spy")


def app_parts(raw: Path, requests: int) -> dict[str, float]:
    """µs per request by part from py-spy's raw output (`frame;frame;... count` per line)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        samples = int(n)
        total += samples
        frames = stack.split(";")
        for label, belongs in APP_PARTS:
            if any(belongs(frame) for frame in frames):
                counts[label] += samples
        if frames[-1].startswith(("Runner.run (", "run_until_complete (")):
            counts[LOOP_SELF] += samples
    us = 1e6 / PY_SPY_HZ / max(requests, 1)
    parts = {"sampled": total * us}
    parts.update({label: counts[label] * us for label, _ in APP_PARTS})
    parts[LOOP_SELF] = counts[LOOP_SELF] * us
    return parts


def nats_parts(perf: str, data: Path, requests: int) -> dict[str, float]:
    """µs per request by part from a perf recording of nats-server (cpu-clock, in ns)."""
    report = subprocess.run(
        [perf, "report", "-i", str(data), "--children", "--sort", "symbol", "--stdio",
         "-g", "none"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    count = re.search(r"^# Event count \(approx\.\): (\d+)", report, re.M)
    if count is None:
        raise RuntimeError("perf report has no event count")
    ns = int(count.group(1))
    shares: dict[str, float] = {}
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].endswith("%") and fields[2] == "[.]":
            shares.setdefault(fields[3], float(fields[0].rstrip("%")) / 100)
    us = ns / 1000 / max(requests, 1)
    parts = {"sampled": us}
    for label, suffix in NATS_PARTS:
        share = next((s for symbol, s in shares.items() if symbol.endswith(suffix)), 0.0)
        parts[label] = share * us
    return parts


@dataclass
class Sampled:
    """One route under load: its rate, the CPU per callback the kernel counted for the app's
    process and nats-server, and each side's parts (or why that side was not sampled)."""

    rate: float
    cpu: dict[str, float]  # "app", "nats"
    parts: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def sample(base: str, app_pid: int, nats_pid: int, duration: int, out: Path) -> Sampled:
    """wrk against `base` for `duration` s while both processes are sampled."""
    wrk(base, 2)  # warm: connections, caches, the first batches
    tools = {"app": py_spy(), "nats": shutil.which("perf")}
    commands = {
        "app": [str(tools["app"]), "record", "-p", str(app_pid), "-r", str(PY_SPY_HZ),
                "-f", "raw", "-o", str(out / "app.txt"), "-d", str(duration + 2),
                "--nonblocking"],
        "nats": [str(tools["nats"]), "record", "-F", str(PERF_HZ), "-g", "-p", str(nats_pid),
                 "-o", str(out / "nats.data"), "--", "sleep", str(duration + 2)],
    }  # fmt: skip
    recorders = {
        side: subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for side, command in commands.items()
        if tools[side] is not None
    }
    time.sleep(0.5)  # both attached before the load starts
    result = measured(base, duration, app_pid, nats_pid)
    requests = max(int(result["requests"]), 1)
    found = Sampled(result["rate"], {"app": result["app_us"], "nats": result["nats_us"]})
    if tools["app"] is None:
        found.errors["app"] = "py-spy is not installed (make profile installs it)"
    if tools["nats"] is None:
        found.errors["nats"] = "perf is not installed (apt-get install linux-perf)"
    for side, proc in recorders.items():
        _, err = proc.communicate(timeout=duration + 60)
        try:
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"exit status {proc.returncode}")
            if side == "app":
                found.parts[side] = app_parts(out / "app.txt", requests)
            else:
                found.parts[side] = nats_parts(str(tools["nats"]), out / "nats.data", requests)
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as exc:
            found.errors[side] = str(exc)[:200]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds sampled per route")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="smsbus-profile-") as tmp:
        work = Path(tmp)
        for name in ("smsbus", "naive"):
            (work / name).mkdir()
        bus = Smsbus(work)
        bus.start()
        try:
            assert bus.proc is not None
            nats_pid = children(bus.proc.pid)[0]
            ours = sample(bus.base, bus.proc.pid, nats_pid, args.duration, work / "smsbus")
            naive = Bare("naive_app", NAIVE_NATS_URL=f"nats://127.0.0.1:{bus.nats_port}")
            naive.start()
            try:
                assert naive.proc is not None
                theirs = sample(naive.base, naive.proc.pid, nats_pid, args.duration, work / "naive")
            finally:
                naive.stop()
        finally:
            bus.stop()
    report(ours, theirs, args.duration)


def report(ours: Sampled, theirs: Sampled, duration: int) -> None:
    print(f"== where a callback's CPU goes: wrk -t2 -c32 -d{duration}s, unique server_ids; "
          "µs per callback (naive: the hand-written route, bench/naive_app.py)")  # fmt: skip
    print(f"{'':<62}{'smsbus':>9}{'naive':>9}")
    print(f"{'callbacks a second (while sampled)':<62}{ours.rate:>9.0f}{theirs.rate:>9.0f}")
    for side, what in (("app", "the app's process"), ("nats", "nats-server")):
        print(f"{'CPU of ' + what + ' (/proc)':<62}{ours.cpu[side]:>9.1f}{theirs.cpu[side]:>9.1f}")
    sides = (
        ("app", f"app process, py-spy at {PY_SPY_HZ} Hz, scaled to its CPU time",
         [label for label, _ in APP_PARTS] + [LOOP_SELF]),
        ("nats", f"nats-server, perf at {PERF_HZ} Hz", [label for label, _ in NATS_PARTS]),
    )  # fmt: skip
    for side, title, labels in sides:
        error = ours.errors.get(side) or theirs.errors.get(side)
        if error:
            print(f"-- {title}: not sampled: {error}")
            continue
        # py-spy counts a thread that is runnable but waiting for a core as busy: its samples
        # are scaled to the CPU time the kernel counted. perf counts CPU time itself.
        scales = [r.cpu[side] / r.parts[side]["sampled"]
                  if side == "app" and r.parts[side]["sampled"] > 0 else 1.0
                  for r in (ours, theirs)]  # fmt: skip
        print(f"-- {title}")
        sampled = "sampled, before scaling" if side == "app" else "sampled"
        print(f"  {sampled:<60}{ours.parts[side]['sampled']:>9.1f}"
              f"{theirs.parts[side]['sampled']:>9.1f}")  # fmt: skip
        for label in labels:
            print(f"  {label:<60}{ours.parts[side][label] * scales[0]:>9.1f}"
                  f"{theirs.parts[side][label] * scales[1]:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
