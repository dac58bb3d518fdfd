"""The local spool: events that NATS did not acknowledge in time, kept on disk until it does.

SQLite in WAL mode with `synchronous=FULL`: a row is on disk before `append` returns, so a callback
can be answered `OK` from the spool. Appends that arrive together are written in one transaction
(group commit: one fsync for many callbacks during an outage). All database work runs on one
dedicated thread, so the event loop never waits on the disk and SQLite sees one connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bus.errors import PublishError, StartupError
from bus.events import Event, traceparent_of

T = TypeVar("T")

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

    async def open(self) -> None:
        try:
            self.depth = await self._run(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(
                f"SMSBUS_DATA_DIR: cannot open the spool {self.path}: {exc}"
            ) from exc
        self._on_depth(self.depth)

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
        return await self._run(self._head, limit)

    async def delete(self, seqs: list[int]) -> None:
        if seqs:
            self.depth = await self._run(self._delete, seqs)
            self._on_depth(self.depth)

    async def mark_stored(self, seqs: list[int]) -> None:
        """JetStream acknowledged these rows' events; their states are still owed."""
        if seqs:
            await self._run(self._mark_stored, seqs)

    async def mark_sent(self, seqs: list[int], at: float) -> None:
        """These rows' events were sent at `at` and no answer came: JetStream may hold them."""
        if seqs:
            await self._run(self._mark_sent, seqs, at)

    async def _commit_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                self.depth = await self._run(self._insert, [(e, s, t) for e, s, t, _ in batch])
            except (sqlite3.Error, OSError) as exc:
                error = PublishError(f"spool write failed: {exc}")
                for _, _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._on_depth(self.depth)
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


def _event(event_id: str, subject: str, kind: str, provider: str, payload: bytes) -> Event:
    return Event(
        id=event_id, subject=subject, type=kind, provider=provider, payload=payload,
        traceparent=traceparent_of(payload),
    )  # fmt: skip
