"""The local spool: events that NATS did not acknowledge in time, kept on disk until it does.

SQLite in WAL mode with `synchronous=FULL`: a row is on disk before `append` returns, so a callback
can be answered `OK` from the spool. Appends that arrive together are written in one transaction
(group commit: one fsync for many callbacks during an outage). All database work runs on one
dedicated thread, so the event loop never waits on the disk and SQLite sees one connection.

A disk that refuses writes (full, or failing) refuses a deletion too: SQLite writes the change to
its WAL first. Rows whose events are in the stream but could not be deleted are then left out of
`head` and `depth`, and deleted with the next deletion the disk takes: new events need not queue
behind events already stored, so callbacks are answered from JetStream again as soon as NATS
is back, full disk or not. A restart before that publishes them again; the stream drops the
repeats within its duplicate window, and a status fact's state drops them beyond it. Sends the
disk would not let us record are kept in memory the same way, and `head` gives them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from bus.errors import PublishError, StartupError
from bus.events import Event, traceparent_of

T = TypeVar("T")
log = structlog.get_logger("smsbus.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT NOT NULL,
    subject  TEXT NOT NULL,
    type     TEXT NOT NULL,
    provider TEXT NOT NULL,
    payload  BLOB NOT NULL,
    spooled_at REAL NOT NULL DEFAULT 0,
    stored   INTEGER NOT NULL DEFAULT 0,
    sent_first REAL,
    sent_last  REAL
)
"""


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    event: Event
    spooled_at: float  # unix time; 0 for rows spooled by a release that did not record it
    stored: bool = False  # JetStream holds the event; only its state is still to be written
    # When it was first and last sent without an answer (unix times; None when it never was):
    # JetStream may hold it (bus.publisher).
    sent: tuple[float, float] | None = None


class Spool:
    def __init__(self, path: Path, on_depth: Callable[[int], None] = lambda depth: None) -> None:
        self.path = path
        self.depth = 0
        self._on_depth = on_depth
        self._db: sqlite3.Connection | None = None
        self._rows = 0  # the row count, owned by the spool thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smsbus-spool")
        self._pending: list[tuple[Event, bool, float | None, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._done: set[int] = set()  # rows done with that the disk would not let us delete
        self._sent: dict[int, tuple[float, float]] = {}  # sends it would not let us record
        self._refused = False  # the last append failed

    async def open(self) -> None:
        try:
            rows = await self._run(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(
                f"SMSBUS_DATA_DIR: cannot open the spool {self.path}: {exc}"
            ) from exc
        self._count(rows)

    def _count(self, rows: int) -> None:
        self.depth = rows - len(self._done)
        self._on_depth(self.depth)

    def free_bytes(self) -> float:
        """Free space on the spool's disk, for the gauge read at each scrape; NaN if unknown."""
        try:
            return float(shutil.disk_usage(self.path.parent).free)
        except OSError:
            return math.nan

    @property
    def undeleted(self) -> int:
        """Rows done with that are still on disk, the disk having refused their deletion."""
        return len(self._done)

    async def close(self) -> None:
        if self._committer is not None:
            await asyncio.shield(self._committer)
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    async def append(
        self, event: Event, stored: bool = False, sent_at: float | None = None
    ) -> None:
        """Store the event durably; raise PublishError if the disk refuses it. `stored`: JetStream
        holds it already, only its state is owed (bus.projection); `sent_at`: it was sent then
        and no answer came (it may be stored)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((event, stored, sent_at, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_pending())
        await future

    async def head(self, limit: int) -> list[Row]:
        """The oldest rows, in the order they were spooled."""
        done, sent = self._done, self._sent
        rows = await self._run(self._head, limit + len(done))
        rows = [row for row in rows if row.seq not in done][:limit]
        return [_with_sent(row, sent[row.seq]) if row.seq in sent else row for row in rows]

    async def delete(self, seqs: list[int]) -> None:
        """Delete rows done with, and any the disk refused to delete before; rows it refuses
        now are left out of `head` and `depth` until it takes them (see the module's doc). A
        caller cancelled meanwhile (the drainer, at shutdown) does not stop the deletion from
        being counted: once handed to the spool's thread it happens, and `depth` follows."""
        if seqs or self._done:
            await asyncio.shield(self._delete_counted(seqs))

    async def _delete_counted(self, seqs: list[int]) -> None:
        try:
            rows = await self._run(self._delete, [*self._done, *seqs])
        except (sqlite3.Error, OSError) as exc:
            if not self._done:
                log.warning("spool rows done with but not deleted: the disk refuses writes; "
                            "kept aside until it takes them", error=str(exc))  # fmt: skip
            self._done.update(seqs)
            rows = self._rows
        else:
            if self._done:
                log.info("spool rows kept aside deleted", count=len(self._done))
                self._done.clear()
        for seq in seqs:
            self._sent.pop(seq, None)
        self._count(rows)

    async def mark_stored(self, seqs: list[int]) -> None:
        """JetStream acknowledged these rows' events; their states are still owed. When the
        disk refuses the mark, they are published again with the next drain (the stream drops
        the repeats), and their states are written then."""
        if seqs:
            try:
                await self._run(self._mark_stored, seqs)
            except (sqlite3.Error, OSError) as exc:
                log.warning("spool rows not marked as stored: the disk refuses writes",
                            count=len(seqs), error=str(exc))  # fmt: skip

    async def mark_sent(self, seqs: list[int], at: float) -> None:
        """These rows' events were sent at `at` and no answer came: JetStream may hold them."""
        if not seqs:
            return
        try:
            await self._run(self._mark_sent, seqs, at)
        except (sqlite3.Error, OSError) as exc:
            if not self._sent:
                log.warning("spool rows' sends not recorded: the disk refuses writes; kept in "
                            "memory until the rows are done with", error=str(exc))  # fmt: skip
            for seq in seqs:
                self._sent[seq] = (self._sent.get(seq, (at, at))[0], at)

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                rows = await self._run(self._insert, [(e, s, t) for e, s, t, _ in batch])
            except (sqlite3.Error, OSError) as exc:
                if not self._refused:
                    log.error("spool write failed: what NATS does not take now is refused",
                              error=str(exc))  # fmt: skip
                self._refused = True
                error = PublishError(f"spool write failed: {exc}")
                for _, _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            if self._refused:
                log.info("the spool takes writes again")
                self._refused = False
            self._count(rows)
            for _, _, _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # Everything below runs on the spool thread.

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(spool)")}
        if "spooled_at" not in columns:  # a spool from an earlier release
            db.execute("ALTER TABLE spool ADD COLUMN spooled_at REAL NOT NULL DEFAULT 0")
        if "stored" not in columns:  # ... or from one that left states to a consumer
            db.execute("ALTER TABLE spool ADD COLUMN stored INTEGER NOT NULL DEFAULT 0")
        if "sent_first" not in columns:  # ... or from one that did not record sends
            db.execute("ALTER TABLE spool ADD COLUMN sent_first REAL")
            db.execute("ALTER TABLE spool ADD COLUMN sent_last REAL")
        self._db = db
        (self._rows,) = db.execute("SELECT count(*) FROM spool").fetchone()
        return self._rows

    def _insert(self, events: list[tuple[Event, bool, float | None]]) -> int:
        assert self._db is not None
        with self._db:  # one transaction, one fsync
            self._db.execute("BEGIN IMMEDIATE")
            now = time.time()
            self._db.executemany(
                "INSERT INTO spool (id, subject, type, provider, payload, spooled_at, stored,"
                " sent_first, sent_last) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.id, e.subject, e.type, e.provider, e.payload, now, int(s), t, t)
                 for e, s, t in events],
            )  # fmt: skip
        self._rows += len(events)
        return self._rows

    def _head(self, limit: int) -> list[Row]:
        assert self._db is not None
        cursor = self._db.execute(
            "SELECT seq, id, subject, type, provider, payload, spooled_at, stored, sent_first,"
            " sent_last FROM spool ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [
            Row(seq, _event(id_, subj, kind, prov, bytes(data)), at, bool(stored),
                None if first is None else (first, last if last is not None else first))
            for seq, id_, subj, kind, prov, data, at, stored, first, last in cursor
        ]  # fmt: skip

    def _mark_stored(self, seqs: list[int]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE spool SET stored = 1 WHERE seq = ?", [(s,) for s in seqs])

    def _mark_sent(self, seqs: list[int], at: float) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE spool SET sent_first = coalesce(sent_first, ?), sent_last = ?"
                " WHERE seq = ?",
                [(at, at, s) for s in seqs],
            )

    def _delete(self, seqs: list[int]) -> int:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])
        self._rows -= deleted.rowcount
        return self._rows


def _with_sent(row: Row, sent: tuple[float, float]) -> Row:
    """The row with sends kept in memory added to those on disk."""
    if row.sent is not None:
        sent = (min(row.sent[0], sent[0]), max(row.sent[1], sent[1]))
    return dataclasses.replace(row, sent=sent)


def _event(event_id: str, subject: str, kind: str, provider: str, payload: bytes) -> Event:
    return Event(
        id=event_id, subject=subject, type=kind, provider=provider, payload=payload,
        traceparent=traceparent_of(payload),
    )  # fmt: skip
