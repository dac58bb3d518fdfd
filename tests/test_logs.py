"""A log line is never worth failing or holding up a callback for: when stdout refuses writes (a
closed pipe, a full disk under a redirect) or stalls (a reader that paused), lines are counted
beyond what may wait, and the count is said once it takes lines."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bus.logs import LineWriter, Outbox

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
    assert writer.drain(5)
    out.refuse = True
    writer.urgent(b'{"event":"lost 1"}')
    writer.info(b'{"event":"lost 2"}')  # no event loop here: handed over at once
    assert writer.drain(5)
    assert (2, 2) == (writer.dropped, writer.lost)
    out.refuse = False
    writer.urgent(b'{"event":"back"}')
    assert writer.drain(5)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert ["first", "log lines lost: stdout refused them", "back"] == [
        line["event"] for line in lines
    ]
    assert (2, "warning") == (lines[1]["count"], lines[1]["level"])
    assert (0, 2) == (writer.dropped, writer.lost)


def test_a_closed_pipe_does_not_raise_into_the_caller() -> None:
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb", buffering=0) as out:
        writer = LineWriter(out)
        writer.urgent(b'{"event":"nobody reads this"}')
        writer.urgent(b'{"event":"nor this"}')
        assert writer.drain(5)
        assert 2 == writer.dropped


def test_a_stdout_nobody_reads_holds_up_no_caller_and_loses_only_what_is_beyond_the_limit() -> None:
    """A pipe whose reader has paused: lines are handed over without waiting (the first ones
    written by the caller until the pipe is full, the last of them only in part), up to the
    limit they wait, beyond it they are counted; once the reader is back it gets every line
    that waited, in order and once, then the count."""
    read, write = os.pipe()
    size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
    count = 8 * size // 1000
    chunks = [b"".join(b"%05d" % i + b"x" * 994 + b"\n" for i in range(n, n + 5))
              for n in range(0, count, 5)]  # fmt: skip  # 5,000 bytes: a pipe takes them in part
    with os.fdopen(write, "wb", buffering=0) as out:
        outbox = Outbox(out, lambda n: b"lost %d\n" % n, limit=4 * size)
        handing = threading.Thread(target=lambda: [outbox.put(chunk, 5) for chunk in chunks])
        handing.start()
        handing.join(10)
        assert not handing.is_alive()  # nothing waited for the pipe
        assert not outbox.wait(0.2)  # the writer is stuck on the full pipe
        assert outbox.lost > 0
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read_all(read)))
        reader.start()
        assert outbox.wait(10)
        outbox.put(b"after\n", 1)
        assert outbox.wait(10)
        outbox.close()
    reader.join(10)
    assert not reader.is_alive()
    lines = bytes(got).splitlines()
    kept = [int(line[:5]) for line in lines[:-2]]
    assert kept == list(range(len(kept)))  # the first ones, in order, none missing
    assert len(kept) + outbox.lost == len(chunks) * 5
    assert [b"lost %d" % outbox.lost, b"after"] == lines[-2:]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


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
