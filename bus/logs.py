"""Logging: structlog, configured once by the entry point.

JSON lines when stdout is not a TTY (containers) or SMSBUS_LOG_FORMAT=json; a console renderer on a
TTY. Standard-library loggers (uvicorn, nats-py) are routed through the same renderer.

Lines at info level (one per callback) that come in a burst are gathered for at most FLUSH_EVERY
or FLUSH_BYTES and handed over together; a line after a quiet moment, and a warning or an error
(with everything before it), at once. They are written by a thread of their own (`Outbox`), so
that a stdout that stalls never holds up the event loop.

A terminal that closes under the process (its window closed, an SSH session dropped) makes every
write to it fail: from then on the lines go to /dev/null (`leave_closed_terminal`), so that the
process goes on, or stops gracefully on the SIGHUP that came with it, rather than failing on a
log line.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bus.events import rfc3339

FLUSH_EVERY = 0.1  # seconds
FLUSH_BYTES = 64 * 1024
WAITING_BYTES = 8 * 1024 * 1024  # lines handed over and not yet written, at most
EXIT_WAIT = 5.0  # seconds an exit waits for stdout to take the lines still waiting
LOST = "log lines lost: stdout refused them"


class Outbox:
    """Lines on their way to stdout, written by a thread of their own: a stdout that stalls (a
    paused `less`, a terminal stopped with Ctrl-S, a log driver that blocks while its endpoint is
    away) holds up that thread, never the event loop. Written from the event loop, a pipe that
    nobody read stopped every callback and /readyz after about 300 callbacks. Up to `limit`
    bytes wait; lines beyond are lost and counted, and the count (`note`) takes their place
    among the lines. Lines stdout refuses (a full disk under a redirect, a closed pipe or
    terminal) are lost too, their count said before the next lines it takes."""

    def __init__(
        self, out: BinaryIO, note: Callable[[int], bytes], limit: int = WAITING_BYTES
    ) -> None:
        self._out = out
        self._fd = _fd(out)
        self._note = note
        self._limit = limit
        # [chunk, lines], or [None, lines] for lines lost here, beyond the limit
        self._waiting: collections.deque[list[Any]] = collections.deque()
        self._bytes = 0  # waiting or being written
        self._writing = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.lost = 0  # lines lost since the start
        self.unsaid = 0  # lines stdout refused since it last took some

    @property
    def dropped(self) -> int:
        """Lines lost whose count is not written yet."""
        with self._changed:
            gaps: int = sum(n for chunk, n in self._waiting if chunk is None)
            return self.unsaid + gaps

    def put(self, chunk: bytes, lines: int) -> None:
        with self._changed:
            if self._bytes + len(chunk) > self._limit:
                self.lost += lines
                if self._waiting and self._waiting[-1][0] is None:
                    self._waiting[-1][1] += lines
                else:
                    self._waiting.append([None, lines])
                return
            self._waiting.append([chunk, lines])
            self._bytes += len(chunk)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="smsbus-log-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Until every line handed over is written or lost; False if `timeout` came first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._waiting and not self._writing, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._waiting))
                taken = list(self._waiting)
                self._waiting.clear()
                unsaid = self.unsaid
                self._writing = True
            parts = [self._note(unsaid)] if unsaid else []
            parts += [self._note(n) if chunk is None else chunk for chunk, n in taken]
            size = sum(len(chunk) for chunk, _ in taken if chunk is not None)
            written = self._write(b"".join(parts))
            with self._changed:
                self._bytes -= size
                self._writing = False
                if written:
                    self.unsaid -= unsaid
                else:
                    self.lost += sum(n for chunk, n in taken if chunk is not None)
                    self.unsaid += sum(n for _, n in taken)
                self._changed.notify_all()
            if not written:
                leave_closed_terminal()

    def _write(self, data: bytes) -> bool:
        # To the file descriptor itself where there is one: a thread blocked in a write to
        # sys.stdout's buffer at exit would make the interpreter's own flush of it fail hard.
        try:
            if self._fd is None:
                self._out.write(data)
                self._out.flush()
                return True
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except (OSError, ValueError):
            return False
        return True


def _fd(out: BinaryIO) -> int | None:
    try:
        out.flush()
        return out.fileno()
    except (OSError, ValueError, AttributeError):  # an in-memory stream
        return None


class LineWriter:
    """A structlog logger handing rendered lines (bytes) to an Outbox, info lines in bursts."""

    def __init__(self, out: BinaryIO, note: Callable[[int], bytes] | None = None) -> None:
        self._outbox = Outbox(out, note or _lost_json)
        self._lines: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()
        self._scheduled = False
        self._written = 0.0  # event-loop time of the last hand-over
        atexit.register(self.drain)

    @property
    def dropped(self) -> int:
        """Lines lost whose count is not written yet."""
        return self._outbox.dropped

    @property
    def lost(self) -> int:
        """Lines lost since the start."""
        return self._outbox.lost

    def info(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message)
            self._size += len(message)
            full = self._size >= FLUSH_BYTES
            scheduled = self._scheduled
        if full:
            self.flush()
            return
        if scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a command, a thread): now
            self.flush()
            return
        if loop.time() - self._written >= FLUSH_EVERY:
            self.flush()  # a quiet moment: this line alone, at once
        else:
            self._scheduled = True  # lines in a burst: together, a moment later
            loop.call_later(FLUSH_EVERY, self.flush)

    def urgent(self, message: bytes) -> None:
        with self._lock:
            self._lines.append(message)
        self.flush()

    debug = msg = info
    warning = warn = error = err = critical = exception = fatal = urgent

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
            self._scheduled = False
        if not lines:
            return
        self._outbox.put(b"\n".join(lines) + b"\n", len(lines))
        try:
            self._written = asyncio.get_running_loop().time()
        except RuntimeError:
            pass

    def drain(self, timeout: float = EXIT_WAIT) -> bool:
        """Hand over what is gathered and wait until it is written (at exit: at most
        EXIT_WAIT, since a stdout that has stalled may never take it)."""
        self.flush()
        return self._outbox.wait(timeout)


class _Text:
    """structlog's logger for console lines: the rendered text through a LineWriter."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def info(self, message: str) -> None:
        self._writer.info(message.encode())

    def urgent(self, message: str) -> None:
        self._writer.urgent(message.encode())

    debug = msg = info
    warning = warn = error = err = critical = exception = fatal = urgent


def _now() -> str:
    return rfc3339(datetime.now(UTC))


def _lost_json(count: int) -> bytes:
    return orjson.dumps({"event": LOST, "count": count, "level": "warning",
                         "timestamp": _now()}) + b"\n"  # fmt: skip


def _lost_text(count: int) -> bytes:
    return f"{_now()} [warning  ] {LOST} count={count}\n".encode()


class LinesLost(Collector):
    """smsbus_log_lines_lost_total, from the writer that logging was configured with."""

    def collect(self) -> Any:
        writer = _writer
        yield CounterMetricFamily(
            "smsbus_log_lines_lost",
            "Log lines lost: stdout refused them, or stalled while "
            f"{WAITING_BYTES // 2**20} MiB of them waited",
            value=writer.lost if writer is not None else 0,
        )


_lines: LineWriter | None = None  # where JSON lines go, once configured for JSON
_writer: LineWriter | None = None  # where lines go, JSON or console, once configured
_terminal: set[int] = set()  # stdout and stderr, where each was a terminal when logging began


def leave_closed_terminal() -> bool:
    """Point stdout and stderr, where each was a terminal that has closed since (hung up: every
    write to it fails with EIO), at /dev/null. Python's own writes then succeed as well (its
    buffers flushed at exit: otherwise status 120 instead of smsbus's), and nothing the
    process writes later can fail for want of a terminal. True if one had closed."""
    closed = {fd for fd in _terminal if not os.isatty(fd)}
    if not closed:
        return False
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in closed:
            os.dup2(null, fd)
    finally:
        os.close(null)
    _terminal.difference_update(closed)
    return True


def info_line(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """An info line on a hot path (the callback's summary): with JSON logs, the line structlog
    would write (`event`, `level`, `timestamp` beside the fields), encoded and queued directly,
    a fifth of the cost of the processor chain; otherwise `logger.info`."""
    if _lines is None:
        logger.info(event, **fields)
        return
    fields["event"] = event
    fields["level"] = "info"
    fields["timestamp"] = rfc3339(datetime.now(UTC))
    _lines.info(orjson.dumps(fields))


def _timestamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """RFC 3339 UTC with milliseconds; a third of structlog's ISO TimeStamper's cost."""
    event["timestamp"] = rfc3339(datetime.now(UTC))
    return event


def configure_logging(
    log_format: str = "auto", stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    global _lines, _writer
    stream = stream or sys.stdout
    _terminal.clear()
    _terminal.update(fd for fd in (1, 2) if os.isatty(fd))
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    renderer: Any
    logger: LineWriter | _Text
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        # No local variables in tracebacks: they could hold a credential.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        writer = logger = _lines = LineWriter(stream.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        writer = LineWriter(stream.buffer, _lost_text)
        logger = _Text(writer)
        _lines = None
    _writer = writer
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *args: logger,
        cache_logger_on_first_use=True,
    )
    if as_json:  # the stdlib handler below formats text; its lines join the same writer
        renderer = structlog.processors.JSONRenderer(serializer=_json_text)
    handler = _ToLines(writer)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("asyncio").addFilter(_not_tls_eof_noise)  # added once, however often called


def _not_tls_eof_noise(record: logging.LogRecord) -> bool:
    """False for asyncio's warning that a protocol's eof_received() returned true over TLS: nats-py
    upgrades a connection to TLS under a protocol that was never told so (nats-io/nats.py#574),
    and every connection to a `tls://` NATS that the server closes (a stop, a restart) would
    otherwise log it, at warning level, though nothing is wrong."""
    return not (isinstance(record.msg, str) and record.msg.lower().startswith(_TLS_EOF))


_TLS_EOF = "returning true from eof_received() has no effect when using ssl"


def _json_text(obj: Any, **kw: Any) -> str:
    return orjson.dumps(obj).decode()


class _ToLines(logging.Handler):
    """Standard-library records (uvicorn's, nats-py's) through the LineWriter, so that they keep
    their place among smsbus's own lines and take the same form."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode()
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._writer.urgent(line)
        else:
            self._writer.info(line)
