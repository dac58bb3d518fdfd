"""Logging: structlog, configured once by the entry point.

JSON lines when stdout is not a TTY (containers) or SMSBUS_LOG_FORMAT=json; a console renderer on a
TTY. Standard-library loggers (uvicorn, nats-py) are routed through the same renderer.

Lines at info level (one per callback) that come in a burst are gathered for at most FLUSH_EVERY
or FLUSH_BYTES and handed over together; a line after a quiet moment, and a warning or an error
(with everything before it), at once. The `Outbox` writes them where stdout takes them at once,
and leaves the rest to a thread of its own, so that a stdout that stalls never holds up the
event loop.

A terminal that closes under the process (its window closed, an SSH session dropped) makes every
write to it fail: from then on the lines go to /dev/null (`leave_closed_terminal`), so that the
process goes on, or stops gracefully on the SIGHUP that came with it, rather than failing on a
log line.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import queue
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO, TextIO

import orjson
import structlog
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from bus.events import rfc3339

FLUSH_EVERY = 0.1  # seconds
FLUSH_BYTES = 64 * 1024  # a pipe takes as much at once
WAITING_BYTES = 8 * 1024 * 1024  # lines handed over and not yet written, at most
EXIT_WAIT = 5.0  # seconds an exit waits for stdout to take the lines still waiting
LOST = "log lines lost: stdout refused them"


class Outbox:
    """Lines on their way to stdout: a stdout that stalls (a paused `less`, a terminal stopped
    with Ctrl-S, a log driver that blocks while its endpoint is away) holds up a thread of its
    own, never the event loop. Written from the event loop alone, a pipe that nobody read
    stopped every callback and /readyz after about 300 callbacks. Up to `limit` bytes wait;
    lines beyond are lost and counted, and the count (`note`) takes their place among the
    lines. Lines stdout refuses (a full disk under a redirect, a closed pipe or terminal) are
    lost too, their count said before the next lines it takes.

    While nothing waits, the caller writes a chunk itself if stdout takes it at once: a regular
    file, or on Linux a pipe or terminal through a non-blocking second description of it; only
    what that does not take goes to the thread. Handing every chunk over cost about 2 µs of CPU
    a callback (the two threads taking turns at the GIL). Each counter is written by one side at
    a time: by `put`, and by the thread only while it has something to write."""

    def __init__(
        self, out: BinaryIO, note: Callable[[int], bytes], limit: int = WAITING_BYTES
    ) -> None:
        self._out = out
        self._fd = _fd(out)
        self._twin = _twin(self._fd)  # where the caller writes itself, if anywhere
        self._note = note
        self._limit = limit
        # (chunk, lines), or (None, lines) for lines lost there, beyond the limit
        self._queue: queue.SimpleQueue[tuple[bytes | None, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._callers = threading.Lock()  # a worker thread may log beside the event loop
        # the caller's side
        self._put = 0  # entries handed over
        self._put_bytes = 0
        self._beyond = 0  # lines lost beyond the limit, in all
        self._gap = 0  # ... of which not handed over yet
        # the thread's side
        self._done = 0  # entries written or lost
        self._done_bytes = 0
        self._refused = 0  # lines stdout refused, in all
        self._said = 0  # ... of which the count is written

    @property
    def lost(self) -> int:
        """Lines lost since the start."""
        return self._beyond + self._refused

    @property
    def dropped(self) -> int:
        """Lines lost whose count is not written yet (not counting those about to be)."""
        return self._gap + self._refused - self._said

    def put(self, chunk: bytes, lines: int) -> None:
        with self._callers:
            self._put_now(chunk, lines)

    def _put_now(self, chunk: bytes, lines: int) -> None:
        if self._put_bytes - self._done_bytes + len(chunk) > self._limit:
            self._beyond += lines
            self._gap += lines
            return
        self._hand_gap()
        if self._twin is not None and self._done == self._put and self._refused == self._said:
            try:
                written = _write_all(self._twin, chunk)
            except BlockingIOError as exc:
                written = exc.characters_written
            except (OSError, ValueError):
                self._refused += lines  # the thread has nothing to write: this side's turn
                leave_closed_terminal()
                self.close()  # from now on the thread writes, to stdout itself
                return
            if written == len(chunk):
                return
            chunk = chunk[written:]
            lines = chunk.count(b"\n")
        self._hand((chunk, lines), len(chunk))

    def _hand_gap(self) -> None:
        """The count of lines lost beyond the limit, in their place among the lines."""
        if self._gap:
            self._hand((None, self._gap), 0)
            self._gap = 0

    def _hand(self, entry: tuple[bytes | None, int], size: int) -> None:
        self._put += 1
        self._put_bytes += size
        self._queue.put(entry)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smsbus-log-writer", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Close the second description of stdout, if one was opened (the first is not ours):
        from then on the thread writes every chunk."""
        twin, self._twin = self._twin, None
        if twin is not None and twin != self._fd:
            os.close(twin)

    def wait(self, timeout: float) -> bool:
        """Until every line handed over is written or lost; False if `timeout` came first.
        Lines lost beyond the limit and not followed by any are handed over as their count."""
        with self._callers:
            self._hand_gap()
        deadline = time.monotonic() + timeout
        while self._done < self._put:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _run(self) -> None:
        while True:
            taken = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    taken.append(self._queue.get_nowait())
            unsaid = self._refused - self._said
            try:
                parts = [self._note(unsaid)] if unsaid else []
                parts += [self._note(n) if chunk is None else chunk for chunk, n in taken]
                written = self._write(b"".join(parts))
            except Exception:  # noqa: BLE001 - no memory for the join: lost, counted; go on
                written = False
            if written:
                self._said += unsaid
            else:
                self._refused += sum(n for chunk, n in taken if chunk is not None)
                self._said -= sum(n for chunk, n in taken if chunk is None)  # said again later
                leave_closed_terminal()
            self._done_bytes += sum(len(chunk) for chunk, _ in taken if chunk is not None)
            self._done += len(taken)

    def _write(self, data: bytes) -> bool:
        # To the file descriptor itself where there is one: a thread blocked in a write to
        # sys.stdout's buffer at exit would make the interpreter's own flush of it fail hard.
        try:
            if self._fd is None:
                self._out.write(data)
                self._out.flush()
                return True
            _write_all(self._fd, data)
        except (OSError, ValueError):
            return False
        return True


def _twin(fd: int | None) -> int | None:
    """`fd` itself if a write to it never waits for long (a regular file: the page cache takes
    it); for a pipe or a terminal on Linux, a second, non-blocking description of it (its own
    O_NONBLOCK leaves stdout's other holders alone; elsewhere /dev/fd/N would share theirs);
    otherwise (a socket, an in-memory stream) None."""
    if fd is None:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd
        if (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)) and sys.platform.startswith("linux"):
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: a pipe nobody reads any more
        pass
    return None


def _write_all(fd: int, data: bytes) -> int:
    """Write all of `data`; on a non-blocking descriptor that would have to wait,
    BlockingIOError saying how much was written."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError as exc:
            exc.characters_written = len(data) - len(view)
            raise
        view = view[written:]
    return len(data)


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
        self._flushes = 0  # a flush due later is skipped if another came in between
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
            loop.call_later(FLUSH_EVERY, self._flush_unless_flushed, self._flushes)

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
            self._flushes += 1
        if not lines:
            return
        self._outbox.put(b"\n".join(lines) + b"\n", len(lines))
        try:
            self._written = asyncio.get_running_loop().time()
        except RuntimeError:
            pass

    def _flush_unless_flushed(self, flushes: int) -> None:
        # A burst that filled FLUSH_BYTES was flushed before its due time; flushing again
        # here would hand over the next burst's first lines alone.
        if self._flushes == flushes:
            self.flush()

    def close(self) -> None:
        self._outbox.close()

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
_terminal_lock = threading.Lock()


def leave_closed_terminal() -> bool:
    """Point stdout and stderr, where each was a terminal that has closed since (hung up: every
    write to it fails with EIO), at /dev/null. Python's own writes then succeed as well (its
    buffers flushed at exit: otherwise status 120 instead of smsbus's), and nothing the
    process writes later can fail for want of a terminal. True if one had closed."""
    with _terminal_lock:  # the log's writer thread may find it closed as the loop does
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
    if _writer is not None:  # configured again: the earlier writer's lines go through its thread
        _writer.close()
    with _terminal_lock:
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
