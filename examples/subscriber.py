"""A subscriber to copy: smsbus's events into an application's database, each fact once.

    python examples/subscriber.py --db app.sqlite3            # NATS at nats://127.0.0.1:4222
    python examples/subscriber.py --nats tls://nats.example:4222 --creds app.creds

It binds a durable JetStream consumer (`--durable`, default `app-sms`) on `sms.status.>` and
`sms.inbound.>`, so events published while it is down wait for it. Each event is handled in one
SQLite transaction that first records the event's `id`: an event delivered again (the process
died after committing but before its ack reached NATS) finds its id recorded and changes nothing.
Only then is it acknowledged. A message's current status follows smsbus's rule (README, "Event
schema"): it never moves from a final status back to a non-final one, and a later report wins
over an earlier one. The SQLite tables stand in for the application's own database; keep the
shape: record the id and apply the fact in one transaction, ack after commit.

Needs only nats-py (`pip install nats-py`; `nats-py[nkeys]` for `--creds`); nothing of smsbus is
imported. When nats-py closes its connection for good (it does on a server's error, a user's JWT
past its expiry say), it exits 1, for whatever runs it to start it again, rather than wait on a
connection that will not come back. An ack NATS does not confirm (NATS away, the consumer's
leader moving in a rolling upgrade) costs a redelivery after `--ack-wait`, nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

PER_PHONE = ("smspager", "smsc")  # one id can name a send to several numbers: key by phone too

SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS message (
    provider TEXT, message_id TEXT, phone TEXT, client_ref TEXT,
    status TEXT, final INTEGER, occurred_at TEXT, facts INTEGER,
    PRIMARY KEY (provider, message_id, phone)
);
CREATE TABLE IF NOT EXISTS inbound (
    id TEXT PRIMARY KEY, provider TEXT, message_id TEXT, sender TEXT, recipient TEXT,
    text TEXT, sent_at TEXT
);
"""


def apply(db: sqlite3.Connection, event: dict[str, Any]) -> bool:
    """Handle one event in one transaction; False when its id was handled before."""
    with db:  # commits, or rolls back on an exception
        if db.execute("INSERT OR IGNORE INTO handled VALUES (?)", (event["id"],)).rowcount == 0:
            return False
        data = event["data"]
        if event["type"] == "sms.status":
            _status(db, data)
        elif event["type"] == "sms.inbound":
            db.execute(
                "INSERT OR IGNORE INTO inbound VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event["id"], data["provider"], data["message_id"], data["from"], data["to"],
                 data["text"], data["sent_at"]),
            )  # fmt: skip
    return True


def _status(db: sqlite3.Connection, data: dict[str, Any]) -> None:
    phone = (data.get("phone") or "") if data["provider"] in PER_PHONE else ""
    key = (data["provider"], data["message_id"], phone)
    row = db.execute(
        "SELECT status, final, occurred_at, facts FROM message"
        " WHERE provider = ? AND message_id = ? AND phone = ?",
        key,
    ).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO message VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
            (*key, data.get("client_ref"), data["status"], int(data["final"]),
             data["occurred_at"]),
        )  # fmt: skip
        return
    _, final, occurred_at, facts = row
    # The rule smsbus keeps in its own state: a final status never gives way to a non-final one;
    # between two finals the one that happened later wins (RFC 3339 in UTC: text order is time
    # order), on a tie the one applied later.
    moves = not final or (bool(data["final"]) and data["occurred_at"] >= occurred_at)
    db.execute(
        "UPDATE message SET facts = ?, client_ref = coalesce(client_ref, ?)"
        + (", status = ?, final = ?, occurred_at = ?" if moves else "")
        + " WHERE provider = ? AND message_id = ? AND phone = ?",
        (facts + 1, data.get("client_ref"),
         *((data["status"], int(data["final"]), data["occurred_at"]) if moves else ()), *key),
    )  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    db = sqlite3.connect(args.db)
    try:
        return await consume(args, db)
    finally:
        db.close()


async def consume(args: argparse.Namespace, db: sqlite3.Connection) -> int:
    db.executescript(SCHEMA)

    async def said(exc: Exception) -> None:  # one line per error, not nats-py's traceback
        print(f"subscriber: nats: {exc!r}", file=sys.stderr)

    nc = await nats.connect(
        args.nats, max_reconnect_attempts=-1, user_credentials=args.creds, error_cb=said
    )
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name=args.durable,
        filter_subjects=[f"{args.prefix}.status.>", f"{args.prefix}.inbound.>"],
        deliver_policy=DeliverPolicy.ALL,  # a new consumer starts at the stream's beginning
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=args.ack_wait,
        max_ack_pending=1000,
    )
    try:
        await js.add_consumer(args.stream, config)  # the same config again is accepted
    except nats.js.errors.BadRequestError as exc:
        print(f"subscriber: cannot create consumer {args.durable}: {exc}", file=sys.stderr)
        await nc.close()
        return 1
    sub = await js.pull_subscribe_bind(args.durable, stream=args.stream)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    while not stop.is_set():
        try:
            batch = await sub.fetch(100, timeout=1)
        except TimeoutError:  # nothing new (nats-py raises its own or asyncio's; both are these)
            continue
        except nats.errors.Error as exc:  # NATS away: nats-py reconnects, fetch again
            print(f"subscriber: {exc!r}", file=sys.stderr)
            if nc.is_closed:  # for good: nats-py will not connect again
                print(f"subscriber: NATS connection closed ({nc.last_error!r}); exiting",
                      file=sys.stderr)  # fmt: skip
                return 1
            await asyncio.sleep(1)
            continue
        for msg in batch:
            try:
                event = json.loads(msg.data)
                fresh = apply(db, event)
            except (ValueError, KeyError, TypeError) as exc:
                # Not an event this code understands: keep it out of the way, not lost.
                print(f"subscriber: event at {msg.subject} not handled: {exc!r}", file=sys.stderr)
                with contextlib.suppress(nats.errors.Error):  # else it comes again: same fate
                    await msg.term()
                continue
            try:
                await msg.ack_sync()  # after commit; a lost ack means a redelivery, handled above
            except (TimeoutError, nats.errors.Error) as exc:
                # NATS away, or the consumer's leader moving to another server (a rolling
                # upgrade of NATS): the event comes again after ack_wait and finds its id
                # recorded; the rest of the batch comes again too. Fetch anew.
                print(f"subscriber: ack not confirmed ({exc!r}); it comes again", file=sys.stderr)
                break
            print(json.dumps({"id": event["id"], "applied": fresh}), flush=True)
    # Every ack was confirmed (ack_sync), so close at once: nats-py's drain() waits forever on a
    # pull subscription's pending queue.
    await nc.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--creds", help="a NATS credentials file (a user's JWT and NKEY seed)")
    parser.add_argument("--stream", default="SMS")
    parser.add_argument("--prefix", default="sms")
    parser.add_argument("--durable", default="app-sms")
    parser.add_argument("--db", default="app.sqlite3")
    parser.add_argument(
        "--ack-wait", type=float, default=30.0, help="seconds before an unacked event comes again"
    )
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
