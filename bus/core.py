"""The bus of one process, opened as one async context manager.

`open_bus` starts, in order: the spool, the embedded nats-server (when SMSBUS_NATS_URL is empty),
the NATS connection, the stream and buckets, the publisher and its drainer, the state mirror, the
projector; every long-running loop under one `Supervisor`. It yields a `Bus` with every part
built. Leaving the `async with` stops the loops and closes the resources in reverse order, in one
place: the drainer gets SMSBUS_DRAIN_TIMEOUT to empty the spool before the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import nats.errors
import structlog
from nats.js.kv import KeyValue

from bus.backoff import Backoff
from bus.config import Settings, redact_url
from bus.connection import Connection, describe
from bus.cursors import Cursors
from bus.errors import StartupError
from bus.landed import stored_ids
from bus.messages import MessageState
from bus.metrics import Metrics
from bus.nats_server import EmbeddedNats
from bus.pace import Pace
from bus.projection import Projection, delivery_seconds
from bus.projector import Projector
from bus.publisher import Publisher
from bus.spool import Spool
from bus.state import States
from bus.stream import (
    Buckets,
    bucket_names,
    commit_subject,
    ensure_all,
    look,
    retrying,
    stream_exists,
)
from bus.supervisor import Beat, Supervisor

log = structlog.get_logger("smsbus.bus")

OLDEST_NATS = (2, 10)  # the oldest nats-server release smsbus is tested with

LOCK_FILE = "smsbus.lock"  # in SMSBUS_DATA_DIR: held by the one smsbus that uses it
READINESS_CACHE = 1.0
SCHEMA_CHECK = 5.0  # s: how often, while connected, the stream and buckets are looked for
LANDED_CALL_TIMEOUT = 2.0  # each call of a search of the stream for spooled events
STALL_AFTER = 30.0  # a watch or consumer loop that has not beaten for this long is restarted


@dataclass
class ProviderState:
    """What /readyz says of a provider."""

    enabled: bool = False
    leader: bool = False
    last_success: str | None = None
    last_error: str | None = None


@dataclass
class Readiness:
    ready: bool
    reason: str
    checked: float = field(default_factory=time.monotonic)


@dataclass
class Bus:
    settings: Settings
    metrics: Metrics
    conn: Connection
    publisher: Publisher
    states: States
    cursors: Cursors
    leases: KeyValue
    projector: Projector
    supervisor: Supervisor
    pace: Pace
    providers: dict[str, ProviderState]
    _readiness: Readiness = field(default_factory=lambda: Readiness(False, "starting", 0.0))

    async def readiness(self) -> Readiness:
        """NATS connected, and the stream present (that look-up cached for a second)."""
        if not self.conn.is_connected:
            why = f": {self.conn.last_error}" if self.conn.last_error else ""
            self._readiness = Readiness(False, f"NATS is not connected{why}", checked=0.0)
            return self._readiness
        if time.monotonic() - self._readiness.checked < READINESS_CACHE:
            return self._readiness
        try:
            present = await asyncio.wait_for(stream_exists(self.conn.js, self.settings.stream), 2.0)
        except TimeoutError:
            self._readiness = Readiness(False, "stream check failed: no answer in 2 s")
            return self._readiness
        except nats.errors.Error as exc:  # a stream the server took offline says why
            self._readiness = Readiness(False, f"stream check failed: {describe(exc)}")
            return self._readiness
        if present:
            self._readiness = Readiness(True, "ok")
        else:
            self._readiness = Readiness(False, f"stream {self.settings.stream} is missing")
        return self._readiness

    def detail(self) -> dict[str, object]:
        """/readyz detail: each background task, and each watch or consumer with whether it is
        behind or re-establishing."""
        tasks = self.supervisor.statuses()
        watches: dict[str, Watch] = {
            "state-mirror": self.states.follower,
            "cursor-mirror": self.cursors.follower,
            "projector": self.projector,
        }
        degraded = {n for n, t in tasks.items() if t.down} | {
            n for n, w in watches.items() if w.behind
        }
        return {
            "degraded": sorted(degraded),
            "tasks": {n: t.public() for n, t in tasks.items()},
            "watches": {n: w.public() for n, w in watches.items()},
        }


class Watch(Protocol):
    """A watch or consumer as /readyz shows it."""

    @property
    def behind(self) -> bool: ...

    def public(self) -> dict[str, object]: ...


def hold_data_dir(path: Path) -> BinaryIO:
    """The data directory, writable and this process's alone: an exclusive lock on its
    `smsbus.lock`, held while the returned file is open and dropped by the system when the
    process ends, however it ends. A second smsbus on the same directory (`--pollers-only`
    beside `--no-pollers` with one default directory, two pods on one shared volume) would
    drain the same spool with bookkeeping of its own and start a nats-server on the same store."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
        lock = (path / LOCK_FILE).open("a+b")
    except OSError as exc:
        raise StartupError(f"SMSBUS_DATA_DIR: {path} is not writable: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(32).decode(errors="replace").strip() or "?"
        lock.close()
        raise StartupError(
            f"SMSBUS_DATA_DIR: {path} is in use by another smsbus (pid {holder}); "
            "give each process a data directory of its own"
        ) from None
    except OSError as exc:  # a file system that takes no locks (some network file systems)
        log.warning("data directory not locked", data_dir=str(path), error=exc.strerror)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n".encode())
    lock.flush()
    return lock


def initial_providers(settings: Settings) -> dict[str, ProviderState]:
    # smspilot's callbacks are always received; the others are on with their credentials.
    return {
        name: ProviderState(enabled=name == "smspilot" or p.enabled)
        for name, p in settings.providers.items()
    } or {"smspilot": ProviderState(enabled=True)}


@contextlib.asynccontextmanager
async def open_bus(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Bus]:
    metrics = metrics or Metrics()
    deadline = time.monotonic() + settings.startup_timeout
    supervisor = Supervisor(on_restart=lambda name: metrics.task_restarts.labels(name).inc())
    s = settings
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(hold_data_dir(s.data_dir).close)
        spool = Spool(s.data_dir / "spool.sqlite3", on_depth=metrics.spool_depth.set)
        await spool.open()
        stack.push_async_callback(spool.close)
        metrics.data_dir_free.set_function(spool.free_bytes)
        if s.embedded:
            embedded = EmbeddedNats(
                s.embedded_nats_port, s.data_dir / "nats", sync=s.embedded_nats_sync
            )
            await embedded.start()
            stack.push_async_callback(embedded.stop)
            log.info("embedded nats-server started", url=embedded.url)
            stack.push_async_callback(
                supervisor.spawn("embedded-nats", embedded.watch, backoff=Backoff(0.25, 10.0))
            )
        conn = Connection(s)
        await conn.open(deadline)
        stack.push_async_callback(conn.close)
        reads = Connection(s, name="smsbus-reads")
        await reads.open(deadline)
        stack.push_async_callback(reads.close)
        buckets = await retrying(
            deadline,
            f"SMSBUS_STREAM: cannot create or update {s.stream} and its buckets",
            lambda: ensure_all(conn.js, s),
        )
        # The pollers' leases on the reads' connection too: behind a restart's load, renewals
        # timed out and the leader gave its lease up (bus.connection).
        leases = await retrying(
            deadline,
            f"SMSBUS_STREAM: cannot bind the lease bucket of {s.stream}",
            lambda: reads.js.key_value(bucket_names(s.stream)[2]),
        )
        states = States(
            conn,
            buckets.messages,
            bucket_names(s.stream)[0],
            on_open=lambda p, n: metrics.tracked.labels(p).set(n),
            direct=s.stream_replicas == 1,
            on_batch=lambda outcome: metrics.state_batches.labels(outcome).inc(),
            reads=reads,
            on_read_failed=metrics.state_reads_failed.inc,
        )
        states.atomic, states.batched = buckets.atomic, buckets.states_batched
        await states.start()
        stack.push_async_callback(states.stop)

        def delivered(registered: MessageState, data: Mapping[str, Any]) -> None:
            seconds = delivery_seconds(registered, data)
            if seconds is not None:
                metrics.delivered(registered.provider, str(data["status"]), seconds)

        publisher = Publisher(
            conn, spool, metrics, s.publish_timeout, s.duplicate_window,
            Projection(states, delivered), states.recorded, commit_subject=commit_subject(s.stream),
            tracked=states.with_tracking,
            stored_ids=lambda subject, start, end, wanted: stored_ids(
                conn.nc, conn.jetstream(timeout=LANDED_CALL_TIMEOUT), s.stream, subject, start,
                end, wanted,
            ),
        )  # fmt: skip
        publisher.group_commit(buckets.batched)
        publisher.max_msg_size = buckets.max_msg_size
        await publisher.start()
        stack.push_async_callback(publisher.stop)
        stack.push_async_callback(publisher.flush, s.drain_timeout)
        stack.push_async_callback(supervisor.spawn("spool-drainer", publisher.run))
        stack.push_async_callback(
            supervisor.spawn("state-mirror", states.follower.run, stall_after=STALL_AFTER)
        )
        stack.push_async_callback(supervisor.spawn("mirror-prune", states.mirror.prune_every))
        stack.push_async_callback(supervisor.spawn("state-write-back", states.write_back))
        cursors = Cursors(conn, buckets.cursors, bucket_names(s.stream)[1])
        stack.push_async_callback(
            supervisor.spawn("cursor-mirror", cursors.follower.run, stall_after=STALL_AFTER)
        )
        projector = Projector(conn, states, publisher, s.stream, s.subject_prefix)
        await retrying(
            deadline,
            "SMSBUS_STREAM: cannot set up the projector consumer",
            lambda: projector.ensure(conn.js),
        )
        stack.push_async_callback(
            supervisor.spawn("projector", projector.run, stall_after=STALL_AFTER)
        )
        stack.push_async_callback(supervisor.spawn("legacy-projector", projector.retire_legacy))

        async def keep_schema(beat: Beat) -> None:
            """After a reconnect (a restarted or replaced server), make sure the stream and the
            buckets are there; they normally are, and then this is four look-ups. A server of
            another release (NATS upgraded, or rolled back) may take other batches: writes
            follow what this one takes. Between reconnects, every SCHEMA_CHECK s: what was
            deleted under a running smsbus is made again, as at start (without it, every
            callback would go to the spool and stay there until the next reconnect), and the
            stream's limit on a message (an operator's) is read again for the publisher."""
            seen = conn.generation
            looked = time.monotonic()
            lacks = what_nats_lacks(buckets)
            while True:
                change = conn.change()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.wait(), 1.0)
                beat()
                if not conn.is_connected:
                    continue
                gone: list[str] = []
                if conn.generation == seen:
                    if time.monotonic() - looked < SCHEMA_CHECK:
                        continue
                    looked = time.monotonic()
                    try:
                        gone, publisher.max_msg_size = await look(conn.js, s)
                    except (TimeoutError, nats.errors.Error):
                        continue  # the next look, or the reconnection this may be, tries again
                    if not gone:
                        continue
                    log.warning("stream or buckets missing from NATS; making them again",
                                missing=gone)  # fmt: skip
                try:
                    now = await ensure_all(conn.js, s)
                    await projector.ensure(conn.js)
                    seen = conn.generation
                    states.atomic, states.batched = now.atomic, now.states_batched
                    states.batched_reads = True  # until this server answers one as empty
                    publisher.group_commit(now.batched)
                    publisher.max_msg_size = now.max_msg_size
                    if (lacking := what_nats_lacks(now)) != lacks:
                        lacks = lacking
                        say_what_nats_lacks(server_version(conn), lacks, at_start=False)
                    if gone:
                        log.info("stream and buckets made again", made=gone)
                except (TimeoutError, nats.errors.Error) as exc:
                    log.warning("stream check failed; retrying",
                                missing=gone or None, error=str(exc))  # fmt: skip

        stack.push_async_callback(supervisor.spawn("schema", keep_schema))
        pace = Pace()
        stack.push_async_callback(supervisor.spawn("loop-pace", pace.measure))

        def sample() -> None:
            metrics.nats_connected.set(int(conn.is_connected))
            metrics.poll_pace.set(pace.share if pace.contended else 1.0)
            for name, task in supervisor.statuses().items():
                metrics.task_up.labels(name).set(int(not task.down))
                metrics.task_restarts.labels(name)  # shown at 0 before a first restart

        metrics.before_render = sample
        version = server_version(conn)
        log.info(
            "bus ready",
            nats=", ".join(redact_url(u) for u in s.effective_nats_urls),
            nats_version=shown(version),
            stream=s.stream,
            spool_depth=spool.depth,
        )
        say_what_nats_lacks(version, what_nats_lacks(buckets))
        yield Bus(
            settings=s,
            metrics=metrics,
            conn=conn,
            publisher=publisher,
            states=states,
            cursors=cursors,
            leases=leases,
            projector=projector,
            supervisor=supervisor,
            pace=pace,
            providers=initial_providers(s),
        )


Version = tuple[int, int, int] | None  # a nats-server's major, minor, patch; None: unknown


def server_version(conn: Connection) -> Version:
    """The version the NATS server this connection reached gives in its INFO."""
    version = conn.nc.connected_server_version
    try:
        return version.major, version.minor, version.patch
    except (TypeError, ValueError, AttributeError):  # none given, or not major.minor.patch
        return None


def shown(version: Version) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def what_nats_lacks(buckets: Buckets) -> tuple[str, ...]:
    """The batches that save round trips which the stream and the state bucket do not take (a
    nats-server release before them); every write is still made, one at a time."""
    return tuple(
        what
        for what, has in (
            ("fast batches (2.14+): events and states are written one by one",
             buckets.batched and buckets.states_batched),
            ("atomic batches (2.12+): registrations are written key by key", buckets.atomic),
        )
        if not has
    )  # fmt: skip


def say_what_nats_lacks(version: Version, lacks: tuple[str, ...], at_start: bool = True) -> None:
    """One line when the NATS server is older than what smsbus is built for (at start), or
    when another release took its place and takes other batches."""
    if at_start and version is not None and version[:2] < OLDEST_NATS:
        log.warning(
            "nats-server older than any release smsbus is tested with (2.10 and later)",
            nats_version=shown(version),
        )
    if lacks:
        log.info("NATS takes no " + "; no ".join(lacks), nats_version=shown(version))
    elif not at_start:
        log.info("NATS takes every batch smsbus uses", nats_version=shown(version))
