"""`smsbus tail` prints what the stream stores, one JSON event per line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from smsbus.cli import CLI_CONNECT
from tests.support import SMSBUS, NatsServer, Smsbus, isolated_env, wait_for


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("tail")).start()
    yield bus
    assert 0 == bus.stop()


class Tail:
    def __init__(self, bus: Smsbus, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", ""), **bus.env}
        self.proc = subprocess.Popen(
            [SMSBUS, "tail", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[dict[str, object]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(json.loads(raw))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(10)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def callback(bus: Smsbus, server_id: int, status: int = 2) -> None:
    params = {"server_id": server_id, "status": status}
    assert "OK" == httpx.get(f"{bus.base}/callbacks/smspilot", params=params, timeout=10).text


def subjects(tail: Tail) -> list[object]:
    return [line["subject"] for line in tail.lines if line.get("type") == "sms.status"]


def test_tail_prints_each_stored_event_once(service: Smsbus) -> None:
    tail = Tail(service)
    try:
        # Following starts "from now": poke until the first event shows it is following.
        probe = iter(range(10**12, 10**12 + 1000))
        wait_for(lambda: callback(service, next(probe)) or tail.lines, what="tail to follow")
        callback(service, 777001)
        callback(service, 777001)  # the same fact: stored once, printed once
        callback(service, 777002, status=1)
        wait_for(lambda: "777002" in subjects(tail), what="the last event")
        assert ["777001", "777002"] == [s for s in subjects(tail) if str(s).startswith("7770")]
        event = next(line for line in tail.lines if line.get("subject") == "777002")
        assert "sent" == event["data"]["status"]  # type: ignore[index]
    finally:
        assert 0 == tail.stop()


def test_tail_since_prints_what_was_stored_since_then_and_goes_on(service: Smsbus) -> None:
    callback(service, 778001)  # stored before: not printed
    since = datetime.now(UTC).isoformat()
    callback(service, 778002)
    callback(service, 778003, status=1)
    tail = Tail(service, "--since", since)
    try:
        wait_for(lambda: "778003" in subjects(tail), what="what was stored since then")
        callback(service, 778004)
        wait_for(lambda: "778004" in subjects(tail), what="what comes after")
        assert ["778002", "778003", "778004"] == [
            s for s in subjects(tail) if str(s).startswith("7780")
        ]
    finally:
        assert 0 == tail.stop()


@pytest.mark.parametrize("since", [None, "1h"], ids=["from now", "since"])
def test_tail_goes_on_after_nats_restarts(tmp_path: Path, since: str | None) -> None:
    """With --since, the tail's consumer starts by sequence, not by time: nats-py's ordered
    consumer, made again after the restart, starts from the next sequence and keeps its first
    start time, which the server refuses beside it (the tail then printed nothing more)."""
    server = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus").start()
    tail = None
    try:
        callback(bus, 779001)
        tail = Tail(bus, *(["--since", since] if since else []))
        probe = iter(range(10**12, 10**12 + 1000))
        wait_for(lambda: callback(bus, next(probe)) or tail.lines, what="tail to follow")
        server.restart()
        wait_for(lambda: bus.readyz().get("ready"), timeout=30, what="smsbus back on NATS")
        callback(bus, 779002)
        wait_for(lambda: "779002" in subjects(tail), timeout=30, what="an event after it")
        printed = [s for s in subjects(tail) if str(s).startswith("7790")]
        assert (["779001"] if since else []) + ["779002"] == printed
    finally:
        if tail is not None:
            assert 0 == tail.stop()
        assert 0 == bus.stop()
        server.stop()


def test_tail_since_that_is_no_time_is_one_line(service: Smsbus) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **service.env}
    result = subprocess.run([SMSBUS, "tail", "--since", "yesterday"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert 2 == result.returncode
    assert result.stderr == (
        "smsbus: --since 'yesterday': give RFC 3339 or an age such as 30m, 12h, 7d\n"
    )


def test_tail_without_nats_is_one_line(tmp_path: Path) -> None:
    """Without `smsbus serve` nothing listens on the embedded server's port: the command says
    so at once rather than retrying for CLI_CONNECT."""
    env = {"PATH": os.environ.get("PATH", ""), "SMSBUS_EMBEDDED_NATS_PORT": "1"}
    started = time.monotonic()
    result = subprocess.run(
        [SMSBUS, "tail"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert time.monotonic() - started < CLI_CONNECT
    assert 1 == result.returncode
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "smsbus: SMSBUS_EMBEDDED_NATS_PORT: cannot reach NATS at nats://127.0.0.1:1"
    )
    assert line.endswith("(is `smsbus serve` running?)")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [["tail"], ["deadletters"], ["replay", "--provider", "smspilot"]],
    ids=lambda command: command[0],
)
def test_a_command_that_reads_the_stream_says_when_there_is_none(
    nats_server: NatsServer, command: list[str]
) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **isolated_env(nats_server.url)}
    result = subprocess.run(
        [SMSBUS, *command], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert 1 == result.returncode
    assert result.stderr.strip().splitlines()[-1] == (
        f"smsbus: SMSBUS_STREAM: there is no stream {env['SMSBUS_STREAM']} on this NATS; "
        "has `smsbus serve` run against it?"
    )
    assert "Traceback" not in result.stderr
