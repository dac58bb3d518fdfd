"""examples/subscriber.py against a live smsbus: killed in the middle of a stream of callbacks and
started again, it applies each fact exactly once and keeps each message's status by the final
rule."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from tests.accounts import Operator
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "subscriber.py"
MESSAGES = 150
_ids = itertools.count(random.randrange(10**9, 10**10))


@pytest.fixture
def service(nats_server: NatsServer, tmp_path: Path) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path / "smsbus").start()
    yield bus
    assert 0 == bus.stop()


class Subscriber:
    def __init__(self, bus: Smsbus, db: Path, out: Path, durable: str = "app-sms") -> None:
        self.out = out.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--nats", bus.env["SMSBUS_NATS_URL"],
             "--stream", bus.stream, "--prefix", bus.prefix, "--db", str(db),
             "--ack-wait", "2", "--durable", durable],
            stdout=self.out, stderr=self.out,
        )  # fmt: skip

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(15)
        self.out.close()
        return code


def handled(db: Path) -> set[str]:
    if not db.exists():
        return set()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            return {row[0] for row in conn.execute("SELECT id FROM handled")}
        except sqlite3.OperationalError:  # the schema is not there yet
            return set()


def test_the_example_subscriber_applies_each_fact_once_through_a_restart(
    service: Smsbus, tmp_path: Path
) -> None:
    db, out = tmp_path / "app.sqlite3", tmp_path / "subscriber.log"
    ids = [str(next(_ids)) for _ in range(MESSAGES)]
    service.register(
        *({"provider": "smspilot", "message_id": m, "phone": "7900" + m[-7:], "client_ref": f"r{m}"}
          for m in ids)
    )  # fmt: skip
    subscriber = Subscriber(service, db, out)
    with httpx.Client(base_url=service.base, timeout=10) as client:

        def callback(server_id: str, status: int, error: int | None = None) -> None:
            params = {"server_id": server_id, "status": status}
            if error is not None:
                params["error"] = error
            assert client.get("/callbacks/smspilot", params=params).text == "OK"

        for i, m in enumerate(ids):
            callback(m, 1)  # sent
            callback(m, 2)  # delivered
            callback(m, 2)  # the same fact again: one event
            callback(m, 0)  # a late non-final report: published, the status stays delivered
            if i == MESSAGES // 3:
                wait_for(lambda: len(handled(db)) >= 100, what="the subscriber under way")
                assert subscriber.stop(signal.SIGKILL) == -signal.SIGKILL
                subscriber = Subscriber(service, db, out)

    stored = read_stream(service.env["SMSBUS_NATS_URL"], service.stream, f"{service.prefix}.>")
    facts = {s.event["id"]: s.event for s in stored if s.event["type"] == "sms.status"}
    assert len(facts) == 3 * MESSAGES  # sent, delivered, queued once each; the repeat dropped
    wait_for(lambda: handled(db) == set(facts), timeout=30, what="every fact handled")
    assert subscriber.stop(signal.SIGTERM) == 0
    expected = {m: ("delivered", 1, 3, f"r{m}") for m in ids}
    assert rows(db) == expected

    # Everything delivered again (a new consumer reads the stream from its start): nothing changes.
    again = tmp_path / "again.log"
    subscriber = Subscriber(service, db, again, durable="app-sms-replayed")
    wait_for(
        lambda: again.read_text().count('"applied": false') == len(facts),
        timeout=30, what="every event seen again",
    )  # fmt: skip
    assert subscriber.stop(signal.SIGTERM) == 0
    assert '"applied": true' not in again.read_text()
    assert rows(db) == expected


def rows(db: Path) -> dict[str, tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT message_id, status, final, facts, client_ref FROM message"
        return {row[0]: row[1:] for row in conn.execute(query)}


def test_the_example_subscriber_exits_when_nats_py_closes_its_connection(tmp_path: Path) -> None:
    """With a credentials file (`--creds`), against a NATS of accounts: the user's JWT expires,
    the server ends the connection with an error, and nats-py closes it for good. The example
    says so and exits 1, for its supervisor to start it again, instead of waiting forever."""
    operator = Operator()
    creds, _ = operator.user(tmp_path / "app.creds", "app", expires=time.time() + 8)
    server = NatsServer(tmp_path / "nats", config=operator.server_config()).start()
    out = tmp_path / "subscriber.log"
    try:

        async def make_stream() -> None:
            nc = await nats.connect(server.url, user_credentials=str(creds))
            await nc.jetstream().add_stream(name="SMS", subjects=["sms.>"])
            await nc.close()

        asyncio.run(make_stream())
        with out.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--nats", server.url, "--creds", str(creds),
                 "--db", str(tmp_path / "app.sqlite3")],
                stdout=log, stderr=log,
            )  # fmt: skip
        try:
            assert 1 == proc.wait(30)
        finally:
            proc.kill()
        assert "subscriber: NATS connection closed" in out.read_text()
    finally:
        server.stop()
