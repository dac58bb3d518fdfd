"""The chaos, soak and landed-search scripts under bench/, run short: they must pass, and say what
they did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, timeout: float, tmp: Path | None = None) -> str:
    """The script's output, once it passed; with `tmp` as its TMPDIR, that it left nothing there
    (a run leaves tens of MB of stores and logs, which `make test` would pile up)."""
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    print(done.stdout)
    assert 0 == done.returncode, done.stdout[-3000:] + done.stderr[-3000:]
    if tmp is not None:
        assert [] == sorted(p.name for p in tmp.iterdir())
    return done.stdout


@pytest.mark.parametrize(
    ("topology", "duration"), [("cluster", 40), ("single", 30), ("embedded", 30)]
)
def test_chaos_loses_and_doubles_nothing(topology: str, duration: int, tmp_path: Path) -> None:
    args = ("--topology", topology, "--duration", str(duration), "--rate", "50")
    out = run("chaos.py", *args, timeout=400, tmp=tmp_path)
    faults = re.search(r"faults: (\d+) \((.*)\)", out)
    kinds = ["kill nats", "pause nats", "kill smsbus"]
    if topology == "cluster":
        kinds.append("lame duck nats")
    assert faults is not None and int(faults.group(1)) >= len(kinds)
    for kind in kinds:
        assert kind in faults.group(2)
    for label in ("callbacks answered OK", "scripted provider statuses", "inbound SMS"):
        tally = re.search(rf"{label}: expected (\d+), stored (\d+), missing 0, duplicated 0", out)
        assert tally is not None and int(tally.group(1)) > 0, label
    polled = re.search(
        r"registered after a fault and polled within interval \+ 2 s: (\d+) of (\d+)", out
    )
    assert polled is not None
    if topology != "cluster":
        assert polled.group(1) == polled.group(2)
    assert "result: PASS" in out


def test_soak_shows_no_leak(tmp_path: Path) -> None:
    # 300/s leaves the load generator headroom on a busy CI machine; `make soak` runs 500/s.
    out = run(
        "soak.py", "--duration", "40", "--every", "8", "--rate", "300", timeout=300, tmp=tmp_path
    )
    assert len(re.findall(r"^\s+\d+\s+\d+\s+0\s", out, re.MULTILINE)) >= 4  # samples, all OK
    assert "result: PASS" in out


def test_landed_search_bench_finds_what_it_looks_for() -> None:
    out = run("landed.py", "--messages", "3000", "--rounds", "1", timeout=120)
    assert re.search(r"raw search [\d,]+ messages/s \(found 1\); nats-py fetch [\d,]+ "
                     r"messages/s \(read 3000\)", out), out  # fmt: skip
    assert "an id tenth in the range: found 1 in" in out
