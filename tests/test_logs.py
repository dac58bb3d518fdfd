"""A log line is never worth failing a callback for: when stdout refuses writes (a closed pipe,
a full disk under a redirect), lines are counted and the count is said once it takes lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bus.logs import LineWriter

ROOT = Path(__file__).resolve().parent.parent


class Refusing(io.BytesIO):
    """A stream whose writes fail while `refuse` is set, as a full disk's do."""

    refuse = False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.refuse:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_refused_lines_are_counted_and_the_count_said_when_lines_are_taken_again() -> None:
    out = Refusing()
    writer = LineWriter(out)
    writer.urgent(b'{"event":"first"}')
    out.refuse = True
    writer.urgent(b'{"event":"lost 1"}')
    writer.info(b'{"event":"lost 2"}')  # no event loop here: written at once
    assert 2 == writer.dropped
    out.refuse = False
    writer.urgent(b'{"event":"back"}')
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert ["first", "log lines lost: stdout refused them", "back"] == [
        line["event"] for line in lines
    ]
    assert (2, "warning") == (lines[1]["count"], lines[1]["level"])
    assert 0 == writer.dropped


def test_a_closed_pipe_does_not_raise_into_the_caller() -> None:
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb", buffering=0) as out:
        writer = LineWriter(out)
        writer.urgent(b'{"event":"nobody reads this"}')
        writer.urgent(b'{"event":"nor this"}')
        assert 2 == writer.dropped


MID_WRITE = """
import asyncio, io, os, signal, sys
import structlog, uvloop
from bus.logs import configure_logging
from smsbus.serve import _Stop

class Terminal(io.RawIOBase):
    '''Where log lines go; the stop signal arrives while the first is being written, as when a
    write to a full pipe or a slow terminal is interrupted by it.'''
    interrupted = False
    def writable(self):
        return True
    def write(self, data):
        if not Terminal.interrupted:
            Terminal.interrupted = True
            os.kill(os.getpid(), signal.SIGTERM)
        return len(data)

async def main():
    out = io.TextIOWrapper(io.BufferedWriter(Terminal()))  # kept: closed when collected
    configure_logging(sys.argv[1], out)
    signal.signal(signal.SIGTERM, _Stop())  # while starting: a stop signal ends the start
    try:
        structlog.get_logger("smsbus").warning("a line being written")
        print("the code that logged went on", flush=True)
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        print("stopped", flush=True)

with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    runner.run(main())
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_stop_signal_arriving_mid_write_neither_hangs_nor_raises(log_format: str) -> None:
    """A signal's handler runs between two bytecodes of whatever the main thread was doing; one
    that wrote a log line itself would re-enter the writer it interrupted (a lock held: the
    process hangs; a buffered stream mid-write: an error raised into the code that logged)."""
    done = subprocess.run([sys.executable, "-c", MID_WRITE, log_format], capture_output=True,
                          text=True, timeout=15, cwd=ROOT)  # fmt: skip
    assert ("the code that logged went on\nstopped\n", 0) == (done.stdout, done.returncode), (
        done.stderr
    )
