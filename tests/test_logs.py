"""A log line is never worth failing a callback for: when stdout refuses writes (a closed pipe,
a full disk under a redirect), lines are counted and the count is said once it takes lines."""

from __future__ import annotations

import io
import json
import os

from bus.logs import LineWriter


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
