"""Logging: structlog, configured once by the entry point.

JSON lines when stdout is not a TTY (containers) or SMSBUS_LOG_FORMAT=json; a console renderer on a
TTY. Standard-library loggers (uvicorn, nats-py) are routed through the same renderer.

JSON lines at info level (one per callback) that come in a burst are gathered for at most
FLUSH_EVERY or FLUSH_BYTES and written with one system call; a line after a quiet moment, and a
warning or an error (with everything before it), is written at once.

A terminal that closes under the process (its window closed, an SSH session dropped) makes every
write to it fail: from then on the lines go to /dev/null (`leave_closed_terminal`), so that the
process goes on, or stops gracefully on the SIGHUP that came with it, rather than failing on a
log line.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

import orjson
import structlog

from bus.events import rfc3339

FLUSH_EVERY = 0.1  # seconds
FLUSH_BYTES = 64 * 1024


class LineWriter:
    """A structlog logger writing rendered JSON lines to a binary stream, info lines in bursts."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._lines: list[bytes] = []
        self._size = 0
        self._lock = threading.Lock()
        self._scheduled = False
        self._written = 0.0  # event-loop time of the last write
        self.dropped = 0  # lines the stream refused since it last took some
        atexit.register(self.flush)

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
        except RuntimeError:  # no event loop (a command, a thread): write now
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
        if self.dropped:
            lines.insert(0, _dropped_line(self.dropped))
        try:
            self._out.write(b"\n".join(lines) + b"\n")
            self._out.flush()
        except (OSError, ValueError):
            # stdout refuses (a full disk under a redirect, a closed pipe, a closed terminal): a
            # log line is not worth failing a callback or a drain for. The count is said once it
            # takes lines.
            self.dropped += len(lines) - (1 if self.dropped else 0)
            leave_closed_terminal()
            return
        self.dropped = 0
        try:
            self._written = asyncio.get_running_loop().time()
        except RuntimeError:
            pass


def _dropped_line(count: int) -> bytes:
    return orjson.dumps({"event": "log lines lost: stdout refused them", "count": count,
                         "level": "warning", "timestamp": rfc3339(datetime.now(UTC))})  # fmt: skip


class ConsoleWriter:
    """A structlog logger writing rendered console lines to a text stream; a line the stream
    refuses (a closed terminal) is lost rather than raised into the code that logged it."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                self._out.write(message + "\n")
                self._out.flush()
            except (OSError, ValueError):
                leave_closed_terminal()

    debug = info = warning = warn = error = err = critical = exception = fatal = msg


_lines: LineWriter | None = None  # where JSON lines go, once configured for JSON
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
    global _lines
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
    factory: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        # No local variables in tracebacks: they could hold a credential.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        writer = _lines = LineWriter(stream.buffer)
        factory = lambda *args: writer  # noqa: E731
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        console = ConsoleWriter(stream)
        factory = lambda *args: console  # noqa: E731
        _lines = None
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler: logging.Handler
    if as_json:  # the stdlib handler below formats text; its lines join the same writer
        renderer = structlog.processors.JSONRenderer(serializer=_json_text)
        handler = _ToLines(writer)
    else:
        handler = _ToConsole(console)
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
    """Standard-library records (uvicorn's, nats-py's) as JSON lines through the LineWriter, so
    that they keep their place among smsbus's own lines and take the same form."""

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


class _ToConsole(logging.Handler):
    """Standard-library records as console lines through the ConsoleWriter, which neither
    interleaves them with smsbus's own lines nor raises when the terminal has closed."""

    def __init__(self, writer: ConsoleWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)
            return
        self._writer.msg(line)
