"""`smsbus tail` prints what the stream stores, one JSON event per line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
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
