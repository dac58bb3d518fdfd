"""Nothing acknowledged is lost: NATS dying, smsbus dying, and a graceful stop mid-publish."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats as nats_client
import pytest

from bus import nats_server
from tests.support import (
    HangingLink,
    NatsServer,
    Smsbus,
    Terminal,
    free_port,
    isolated_env,
    read_stream,
    wait_for,
)

pytestmark = pytest.mark.slow

PUBLISH_TIMEOUT = 1.0
_ids = itertools.count(random.randrange(10**9, 10**10))


@dataclass
class Answer:
    server_id: str
    status: int | None
    text: str
    seconds: float


def call(client: httpx.Client, server_id: str) -> Answer:
    started = time.monotonic()
    try:
        response = client.get("/callbacks/smspilot", params={"server_id": server_id, "status": 2})
        status, text = response.status_code, response.text
    except httpx.TransportError as exc:
        status, text = None, type(exc).__name__
    return Answer(server_id, status, text, time.monotonic() - started)


class Load:
    """Callbacks with unique server_ids from several threads until stopped."""

    def __init__(self, base: str, workers: int = 6) -> None:
        self.base = base
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(workers)
        self._futures = [self._pool.submit(self._run) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self._stop.is_set():
                answer = call(client, str(next(_ids)))
                with self._lock:
                    self.answers.append(answer)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_more(self, n: int) -> None:
        target = self.count() + n
        wait_for(lambda: self.count() >= target, timeout=30, what=f"{n} more answers")

    def stop(self) -> list[Answer]:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self.answers


def stored_ids(nats: NatsServer, bus: Smsbus) -> collections.Counter[str]:
    items = read_stream(nats.url, bus.stream, f"{bus.prefix}.status.>")
    return collections.Counter(item.event["data"]["message_id"] for item in items)


def _embedded_smsbus(tmp_path: Path, **limits: int) -> tuple[Smsbus, int]:
    """smsbus with its embedded nats-server (on a port of the test's) and SMSBUS_PUBLISH_TIMEOUT
    at PUBLISH_TIMEOUT, started: the process, and the server's port."""
    nats_port = free_port()
    env = {
        "SMSBUS_EMBEDDED_NATS_PORT": str(nats_port),
        "SMSBUS_PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT),
    }
    return Smsbus(env, tmp_path / "bus", **limits).start(), nats_port


def _embedded_task(bus: Smsbus) -> dict[str, object]:
    """The `embedded-nats` task as /readyz shows it."""
    return dict(bus.readyz()["tasks"]["embedded-nats"])


def _stored_in_embedded(nats_port: int, bus: Smsbus) -> collections.Counter[str]:
    """Each message id's status events in the stream of `bus`'s embedded server."""
    items = read_stream(f"nats://127.0.0.1:{nats_port}", bus.stream, "sms.status.>")
    return collections.Counter(item.event["data"]["message_id"] for item in items)


def test_nats_sigkill_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(
        isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT)), tmp_path / "bus"
    ).start()
    try:
        load = Load(bus.base)
        load.wait_more(150)
        nats.kill(signal.SIGKILL)
        load.wait_more(150)  # all of these can only be answered from the spool
        nats.start()
        wait_for(lambda: bus.spool_depth() == 0, timeout=30, what="the spool to drain")
        load.wait_more(100)
        answers = load.stop()
        # A callback sent just before the kill may be answered from the spool only now, when its
        # request to the old server has timed out: the spool is drained once more.
        wait_for(lambda: bus.spool_depth() == 0, timeout=30, what="the spool to drain")

        assert [] == [a for a in answers if (a.status, a.text) != (200, "OK")]
        slowest = max(a.seconds for a in answers)
        assert slowest <= PUBLISH_TIMEOUT + 1, f"slowest answer took {slowest:.2f} s"
        counts = stored_ids(nats, bus)  # every OK was an ack or a spool row; the spool is empty
        outcomes = collections.Counter(
            line["outcome"] for line in bus.log_lines() if line.get("event") == "callback"
        )
        assert outcomes["spooled"] > 0 and outcomes["published"] > 0, outcomes
        assert {a.server_id for a in answers} == set(counts)
        assert [] == [sid for sid, n in counts.items() if n != 1]
        assert 0 == bus.stop()
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def test_events_spooled_before_a_crash_are_published_on_the_next_start(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    env = isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT))
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        nats.kill(signal.SIGKILL)
        ids = [str(next(_ids)) for _ in range(20)]
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            answers = [call(client, server_id) for server_id in ids]
        assert [(200, "OK")] * 20 == [(a.status, a.text) for a in answers]
        readiness = httpx.get(f"{bus.base}/readyz", timeout=5)
        assert 503 == readiness.status_code
        assert (False, 20) == (readiness.json()["ready"], readiness.json()["spool_depth"])
        bus.kill()

        nats.start()
        bus = Smsbus(env, tmp_path / "bus").start()
        wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        counts = stored_ids(nats, bus)
        assert dict.fromkeys(ids, 1) == dict(counts)
        assert 0 == bus.stop()
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def test_a_full_disk_refuses_callbacks_only_while_nats_is_away_too(tmp_path: Path) -> None:
    """The data directory's disk takes no more (here: a limit on the size of any file the
    process writes, which the spool's WAL reaches after a few events). NATS away: callbacks are
    answered from the spool until it is full, then 503. NATS back: what the spool held is
    published although the disk refuses its deletion too, callbacks are answered from JetStream
    again, and the stop is clean. Every callback answered OK is stored once."""
    nats = NatsServer(tmp_path / "nats").start()
    env = isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT))
    bus = Smsbus(env, tmp_path / "bus", file_size_limit=256 * 1024).start()
    try:
        nats.kill(signal.SIGKILL)
        answered: list[str] = []
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            for _ in range(500):
                answer = call(client, str(next(_ids)))
                if answer.status != 200:
                    break
                answered.append(answer.server_id)
            assert (503, "event could not be stored; try again") == (answer.status, answer.text)
            assert answered, "the spool took nothing"
            assert len(answered) == bus.spool_depth()

            nats.start()
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
            later = [call(client, str(next(_ids))) for _ in range(5)]
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        assert [(200, "OK")] * 5 == [(a.status, a.text) for a in later]
        assert dict.fromkeys(answered + [a.server_id for a in later], 1) == dict(
            stored_ids(nats, bus)
        )
        assert 0 == bus.stop()
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()
    events = [line["event"] for line in bus.log_lines()]
    assert 1 == events.count("spool write failed: what NATS does not take now is refused")
    assert "spool kept for the next start" in events  # its rows, published, not deleted
    assert "Traceback" not in bus.logs()


def test_the_embedded_server_whose_store_failed_a_write_restarts_when_the_disk_takes_writes(
    tmp_path: Path,
) -> None:
    """nats-server stores nothing more into a stream once its store failed a write, until it
    restarts, whatever the disk does next. The disk here: a limit on the size of any file smsbus
    and its embedded server write, which the stream's block reaches after a few hundred events.
    /readyz names the write error and the server is left running while the disk refuses writes;
    once it takes them, the server is restarted, callbacks are stored again, and every callback
    answered OK is stored once."""
    bus, nats_port = _embedded_smsbus(tmp_path, file_size_limit=256 * 1024)
    try:
        [server] = bus.children()
        embedded = functools.partial(_embedded_task, bus)
        answered: list[str] = []
        refused = 0
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            # Callbacks go on: into the stream, then (no ack) into the spool, then 503.
            deadline = time.monotonic() + 30
            while not (refused and embedded()["state"] == "failing"):
                assert time.monotonic() < deadline, f"no write error seen: {bus.readyz()}"
                for _ in range(25):
                    answer = call(client, str(next(_ids)))
                    if (answer.status, answer.text) == (200, "OK"):
                        answered.append(answer.server_id)
                    else:
                        assert (503, "event could not be stored; try again") == (
                            answer.status,
                            answer.text,
                        )
                        refused += 1
            body = bus.readyz()
            assert "write error" in body["tasks"]["embedded-nats"]["last_error"]
            # The disk still refuses writes: no restart, and the drainer, whose tries get no
            # ack and whose record of them the disk refuses, goes on.
            time.sleep(2 * nats_server.ROOM_EVERY)
            assert ([server], 0) == (bus.children(), embedded()["restarts"])
            assert ["embedded-nats"] == bus.readyz()["degraded"]
            assert bus.spool_depth()

            bus.lift_file_size_limit()
            wait_for(lambda: embedded()["state"] == "running", timeout=20, what="a restart")
            assert server not in bus.children()
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
            later = [call(client, str(next(_ids))) for _ in range(5)]
            wait_for(lambda: [] == bus.readyz()["degraded"], what="every task and watch up")
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        assert [(200, "OK")] * 5 == [(a.status, a.text) for a in later]
        answered += [a.server_id for a in later]
        assert len(answered) > 100, "the stream's block filled before a hundred events"
        stored = _stored_in_embedded(nats_port, bus)
        assert {1} == set(stored.values())
        assert [] == [server_id for server_id in answered if server_id not in stored]
        assert 1 == bus.metric("smsbus_task_restarts_total", task="embedded-nats")
        assert 0 == bus.stop()
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
    events = [line["event"] for line in bus.log_lines()]
    assert 1 == sum(e.startswith("the embedded nats-server's store failed a write") for e in events)
    assert 1 == events.count("background task restarting")
    assert 1 == events.count("spool write failed: what NATS does not take now is refused")
    assert 1 == sum(e.startswith("spool rows' sends not recorded") for e in events)
    assert "Traceback" not in bus.logs()


def test_an_embedded_server_that_answers_nothing_is_killed_and_started_again(
    tmp_path: Path,
) -> None:
    """The embedded nats-server stopped (SIGSTOP): running, answering nothing, as in a deadlock.
    A silence shorter than HUNG_AFTER only shows in /readyz and passes when the server answers
    again; a longer one gets the server killed and started again. Callbacks are answered OK all
    along (from the spool while it is silent), and each is stored once."""
    bus, nats_port = _embedded_smsbus(tmp_path)
    [server] = bus.children()
    try:
        embedded = functools.partial(_embedded_task, bus)
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            answers = [call(client, str(next(_ids)))]
            os.kill(server, signal.SIGSTOP)
            wait_for(
                lambda: embedded()["state"] == "failing",
                timeout=nats_server.SILENT_AFTER + 10,
                what="the silence in /readyz",
            )
            assert "answered nothing" in embedded()["last_error"]
            assert "embedded-nats" in bus.readyz()["degraded"]
            answers += [call(client, str(next(_ids))) for _ in range(3)]
            os.kill(server, signal.SIGCONT)
            wait_for(lambda: embedded()["state"] == "running", what="the server answering again")
            assert ([server], 0) == (bus.children(), embedded()["restarts"])

            os.kill(server, signal.SIGSTOP)
            answers += [call(client, str(next(_ids))) for _ in range(3)]
            wait_for(
                lambda: embedded()["restarts"] == 1,
                timeout=nats_server.HUNG_AFTER + 20,
                what="the silent server killed and started again",
            )
            assert not Path(f"/proc/{server}").exists()
            [restarted] = wait_for(bus.children, what="the server started again")
            assert restarted != server
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
            answers += [call(client, str(next(_ids))) for _ in range(5)]
            wait_for(lambda: [] == bus.readyz()["degraded"], what="every task and watch up")
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        assert [(200, "OK")] * 12 == [(a.status, a.text) for a in answers]
        stored = _stored_in_embedded(nats_port, bus)
        assert dict.fromkeys((a.server_id for a in answers), 1) == dict(stored)
        assert 1 == bus.metric("smsbus_task_restarts_total", task="embedded-nats")
        assert 0 == bus.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGCONT)
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
    events = [line["event"] for line in bus.log_lines()]
    assert 2 == events.count("the embedded nats-server does not answer")
    assert 1 == events.count("the embedded nats-server answers again")
    assert 1 == sum(e.startswith("the embedded nats-server has answered nothing") for e in events)
    assert 1 == events.count("background task restarting")
    assert 1 == events.count("embedded nats-server restarted")
    assert "Traceback" not in bus.logs()


def test_an_embedded_server_that_cannot_start_again_is_tried_until_it_can(tmp_path: Path) -> None:
    """The embedded nats-server killed, and its port taken by another process before smsbus
    starts it again: each try is one line (no traceback) and /readyz names the port; once the
    port is free the server starts, and every callback answered meanwhile is stored once."""
    bus, nats_port = _embedded_smsbus(tmp_path)
    squatter: socket.socket | None = None
    try:
        embedded = functools.partial(_embedded_task, bus)
        for _ in range(10):  # the port, taken between the kill and smsbus's next start
            [server] = wait_for(bus.children, what="the embedded server")
            os.kill(server, signal.SIGKILL)
            squatter = _take_port(nats_port, within=0.2)
            if squatter is not None:
                break
        assert squatter is not None, "smsbus started the server again each time first"
        wait_for(lambda: embedded()["restarts"] >= 3, timeout=20, what="three tries")
        assert "is not free" in embedded()["last_error"]
        assert "embedded-nats" in bus.readyz()["degraded"]
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            answers = [call(client, str(next(_ids))) for _ in range(3)]
            squatter.close()
            wait_for(lambda: embedded()["state"] == "running", timeout=20, what="a start")
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
            answers += [call(client, str(next(_ids))) for _ in range(3)]
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        assert [(200, "OK")] * 6 == [(a.status, a.text) for a in answers]
        stored = _stored_in_embedded(nats_port, bus)
        assert dict.fromkeys((a.server_id for a in answers), 1) == dict(stored)
        assert 0 == bus.stop()
    finally:
        if squatter is not None:
            squatter.close()
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
    tries = [line for line in bus.log_lines() if line["event"] == "background task restarting"]
    assert len(tries) >= 3
    assert all("did not start again" in line["reason"] for line in tries[1:])
    assert "Traceback" not in bus.logs()


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "port-changed"])
def test_an_embedded_server_left_running_by_a_dead_smsbus_is_stopped_first(
    tmp_path: Path, same_port: bool
) -> None:
    """Where the embedded nats-server does not die with smsbus (macOS), a crashed smsbus leaves
    it running on the data directory's store. The next start stops it and starts its own:
    before, the port was "not free" and smsbus would not start until the user found that
    process; with another port configured meanwhile, a second server wrote the same store."""
    bus, nats_port = _embedded_smsbus(tmp_path)
    with httpx.Client(base_url=bus.base, timeout=10) as client:
        before = [call(client, str(next(_ids))) for _ in range(3)]
    assert 0 == bus.stop()
    # What a crash leaves where the server outlives smsbus: the server, on its configuration.
    left = subprocess.Popen(
        [str(nats_server.binary()), "-c", str(bus.data_dir / "nats" / "nats-server.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: list((bus.data_dir / "nats").glob(f"*_{left.pid}.ports")),
            timeout=10, what="the left-over server to listen",
        )  # fmt: skip
        if not same_port:
            nats_port = free_port()
            bus.env["SMSBUS_EMBEDDED_NATS_PORT"] = str(nats_port)
        bus.start()
        left.wait(timeout=5)  # TimeoutExpired if it was left running beside the new server
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            after = [call(client, str(next(_ids))) for _ in range(3)]
        assert [(200, "OK")] * 6 == [(a.status, a.text) for a in before + after]
        wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        stored = _stored_in_embedded(nats_port, bus)
        assert dict.fromkeys((a.server_id for a in before + after), 1) == dict(stored)
        assert 0 == bus.stop()
    finally:
        left.kill()
        left.wait()
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
    warned = [
        line for line in bus.log_lines()
        if line["event"].startswith("an embedded nats-server left running by an earlier smsbus")
    ]  # fmt: skip
    assert [left.pid] == [line["pid"] for line in warned]
    assert "Traceback" not in bus.logs()


def test_a_nats_server_that_is_not_smsbus_s_on_its_port_is_left_alone(tmp_path: Path) -> None:
    """A NATS of the user's own on the embedded server's port (a developer's nats-server on
    4222) is not taken for a left-over: smsbus refuses to start, naming the port, and that
    server runs on."""
    other = NatsServer(tmp_path / "other").start()
    try:
        bus = Smsbus({"SMSBUS_EMBEDDED_NATS_PORT": str(other.port)}, tmp_path / "bus")
        bus.start(wait_ready=False)
        assert 1 == bus.proc.wait(timeout=20)  # type: ignore[union-attr]
        assert f"127.0.0.1:{other.port} is not free" in bus.logs()
        assert other.proc is not None and other.proc.poll() is None
    finally:
        other.stop()


def _take_port(port: int, within: float) -> socket.socket | None:
    """A socket listening on 127.0.0.1:`port`, once it is free within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        taken = socket.socket()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server does
        try:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            return taken
        except OSError:
            taken.close()
    return None


def test_sigterm_finishes_in_flight_callbacks_and_flushes_the_spool(tmp_path: Path) -> None:
    """NATS is paused, so callbacks are mid-publish when SIGTERM arrives: they still get OK (from
    the spool), and the shutdown flush publishes them once NATS answers again."""
    with _bus_on_paused_nats(tmp_path) as (nats, bus):
        ids = [str(next(_ids)) for _ in range(10)]
        with ThreadPoolExecutor(10) as pool, httpx.Client(base_url=bus.base, timeout=30) as client:
            futures = [pool.submit(call, client, server_id) for server_id in ids]
            wait_for(lambda: _in_flight(bus) == 10, timeout=10, what="10 callbacks in flight")
            bus.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            answers = [f.result() for f in futures]
            nats.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        assert [(200, "OK")] * 10 == [(a.status, a.text) for a in answers]
        # The flush has SMSBUS_DRAIN_TIMEOUT (30 s), and an event whose message's state cannot
        # be read waits up to 30 s after it was spooled (README, "Read your writes"): the exit
        # may come at 30 s, so the bound is above that, not at it.
        assert 0 == bus.proc.wait(45)  # type: ignore[union-attr]
        assert dict.fromkeys(ids, 1) == dict(stored_ids(nats, bus))
        assert "spool kept for the next start" not in bus.logs()


@contextlib.contextmanager
def _bus_on_paused_nats(tmp_path: Path) -> Iterator[tuple[NatsServer, Smsbus]]:
    """smsbus (SMSBUS_PUBLISH_TIMEOUT=PUBLISH_TIMEOUT) on a nats-server of its own, then that
    server paused: connected, not answering. On the way out the server is resumed, smsbus
    killed if it still runs, and the server stopped."""
    nats = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(
        isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT)), tmp_path / "bus"
    ).start()
    try:
        nats.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        yield nats, bus
    finally:
        if nats.proc is not None:
            nats.proc.send_signal(signal.SIGCONT)
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def _in_flight(bus: Smsbus) -> int:
    for line in httpx.get(f"{bus.base}/metrics", timeout=5).text.splitlines():
        if line.startswith("smsbus_callbacks_in_flight "):
            return int(float(line.split()[1]))
    raise AssertionError("smsbus_callbacks_in_flight is missing from /metrics")


def test_embedded_nats_starts_with_serve_and_stops_with_it(tmp_path: Path) -> None:
    nats_port = free_port()
    env = {"SMSBUS_EMBEDDED_NATS_PORT": str(nats_port)}
    bus = Smsbus(env, tmp_path / "bus").start()
    server_id = str(next(_ids))
    assert (
        "OK"
        == httpx.get(
            f"{bus.base}/callbacks/smspilot", params={"server_id": server_id, "status": 2}
        ).text
    )
    assert 0 == bus.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", nats_port), timeout=1).close()

    bus = Smsbus(env, tmp_path / "bus").start()  # the store survives a restart
    try:
        stored = read_stream(f"nats://127.0.0.1:{nats_port}", "SMS", "sms.status.>")
        assert [server_id] == [s.event["data"]["message_id"] for s in stored]
    finally:
        assert 0 == bus.stop()


def test_every_spooled_event_counts_as_a_publish_failure(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(
        isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT)), tmp_path / "bus"
    ).start()
    try:
        assert 0 == bus.metric("smsbus_publish_failures_total")
        nats.kill(signal.SIGKILL)
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            answers = [call(client, str(next(_ids))) for _ in range(15)]
        assert [(200, "OK")] * 15 == [(a.status, a.text) for a in answers]
        assert 15 == bus.spool_depth()
        assert 15 == bus.metric("smsbus_publish_failures_total")
        nats.start()
        wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        assert 15 == bus.metric("smsbus_publish_failures_total")  # draining is not failing
        assert 0 == bus.stop()
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def _answered_then_spooled(
    bus: Smsbus, nats: NatsServer, published: int, spooled: int
) -> list[str]:
    """`published` callbacks answered from JetStream, then NATS killed and `spooled` more
    answered from the spool: the ids of all of them."""
    with httpx.Client(base_url=bus.base, timeout=10) as client:
        ids = [str(next(_ids)) for _ in range(published)]
        assert all(call(client, i).text == "OK" for i in ids)
        nats.kill(signal.SIGKILL)
        ids += [str(next(_ids)) for _ in range(spooled)]
        assert all(call(client, i).text == "OK" for i in ids[published:])
    assert spooled == bus.spool_depth()
    return ids


def _exits_0_once_nats_is_back(bus: Smsbus, nats: NatsServer) -> None:
    """The stopping process waits for NATS to drain its spool into; NATS back, it exits 0."""
    assert bus.proc is not None
    with pytest.raises(subprocess.TimeoutExpired):
        bus.proc.wait(2)  # still waiting for NATS
    nats.start()
    assert 0 == bus.proc.wait(30)


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM,), (signal.SIGINT, signal.SIGHUP)],
    ids=["pod-deleted", "ctrl-c-then-window-closed"],
)
def test_a_stopped_replica_drains_its_spool_before_its_data_dir_is_deleted(
    tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    """A pod deleted during a NATS outage: SIGTERM with events in the spool, whose emptyDir is
    deleted once the process has exited. It keeps trying for SMSBUS_DRAIN_TIMEOUT, so the events
    reach NATS when it is back in that time, and nothing answered OK is lost. The same after
    Ctrl-C when the window is closed during the drain (or a closing shell sends its jobs SIGHUP
    after the kernel's): only a second Ctrl-C or SIGTERM gives the drain up."""
    nats = NatsServer(tmp_path / "nats").start()
    env = isolated_env(
        nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT), SMSBUS_DRAIN_TIMEOUT="60"
    )
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        ids = _answered_then_spooled(bus, nats, published=5, spooled=25)
        stop, *later = signals
        bus.proc.send_signal(stop)  # type: ignore[union-attr]
        wait_for(lambda: "draining the spool before exit" in bus.logs(), what="the drain")
        for sig in later:
            bus.proc.send_signal(sig)  # type: ignore[union-attr]
        _exits_0_once_nats_is_back(bus, nats)
        shutil.rmtree(bus.data_dir)  # the emptyDir goes with the pod
        assert dict.fromkeys(ids, 1) == dict(stored_ids(nats, bus))
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _signals_and_threads(bus: Smsbus) -> str:
    """The process's state, its pending, blocked and caught signals, and where each of its
    threads waits in the kernel: whether a SIGHUP came, and what holds it up if one did."""
    assert bus.proc is not None
    if bus.proc.poll() is not None:
        return f"smsbus exited {bus.proc.returncode}"
    proc = Path(f"/proc/{bus.proc.pid}")
    fields = ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
    lines = (proc / "status").read_text().splitlines()
    status = [line for line in lines if line.split(":")[0] in fields]
    waits = [f"{t.name} {(t / 'comm').read_text().strip()}: {(t / 'wchan').read_text()}"
             for t in sorted((proc / "task").iterdir())]  # fmt: skip
    return "\n".join(status + waits)


def test_a_closed_terminal_stops_smsbus_as_ctrl_c_does(tmp_path: Path) -> None:
    """`make run` in a terminal window that is closed, or an SSH session that drops: SIGHUP, and
    every write to the terminal fails from then on. smsbus stops as on Ctrl-C: it drains its
    spool into NATS and exits 0; not killed by the SIGHUP with the spooled events left for a
    next start, nor ended by a log line it can no longer write (Python's status 120)."""
    nats = NatsServer(tmp_path / "nats").start()
    env = isolated_env(
        nats.url,
        SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT),
        SMSBUS_DRAIN_TIMEOUT="60",
        SMSBUS_LOG_FORMAT="auto",  # a terminal: the console renderer
    )
    terminal = Terminal()
    bus = Smsbus(env, tmp_path / "bus", terminal=terminal).start()
    try:
        ids = _answered_then_spooled(bus, nats, published=3, spooled=10)
        assert "serving" in terminal.text() and "{" not in terminal.text()
        terminal.hang_up()
        try:
            wait_for(lambda: not _accepts(bus.port), what="smsbus to stop serving")
        except AssertionError as exc:  # whether a SIGHUP came, was caught, or what held it
            said = terminal.text()[-3000:]
            raise AssertionError(f"{exc}\n{_signals_and_threads(bus)}\nterminal:\n{said}") from None
        _exits_0_once_nats_is_back(bus, nats)
        assert dict.fromkeys(ids, 1) == dict(stored_ids(nats, bus))
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def test_smsbus_under_nohup_goes_on_serving_after_sighup(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(nats.url), tmp_path / "bus", wrapper=("nohup",)).start()
    try:
        bus.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        ids = [str(next(_ids)) for _ in range(3)]
        with httpx.Client(base_url=bus.base, timeout=10) as client:
            assert all(call(client, i).text == "OK" for i in ids)
        assert bus.ready()
        assert 0 == bus.stop()
        stops = [(line["event"], line.get("signal")) for line in bus.log_lines()
                 if line["event"].startswith("stop signal")]  # fmt: skip
        assert [("stop signal: finishing the requests in flight, then stopping", "SIGTERM")] == (
            stops
        )
        assert dict.fromkeys(ids, 1) == dict(stored_ids(nats, bus))
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()


def test_embedded_nats_gets_the_configured_sync_interval(tmp_path: Path) -> None:
    env = {"SMSBUS_EMBEDDED_NATS_PORT": str(free_port()), "SMSBUS_EMBEDDED_NATS_SYNC": "always"}
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        config = (tmp_path / "bus" / "nats" / "nats-server.conf").read_text()
        assert "sync_interval: always" in config
        answer = httpx.get(
            f"{bus.base}/callbacks/smspilot", params={"server_id": next(_ids), "status": 2}
        )
        assert "OK" == answer.text
    finally:
        assert 0 == bus.stop()
    bus.env["SMSBUS_EMBEDDED_NATS_SYNC"] = "30s"
    bus.start()
    try:
        assert (
            'sync_interval: "30s"' in (tmp_path / "bus" / "nats" / "nats-server.conf").read_text()
        )
    finally:
        assert 0 == bus.stop()


def _go_maxprocs(bus: Smsbus) -> str:
    (server,) = bus.children()
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"GOMAXPROCS="))


def test_embedded_nats_leaves_a_cpu_to_smsbus_unless_gomaxprocs_is_set(tmp_path: Path) -> None:
    env = {"SMSBUS_EMBEDDED_NATS_PORT": str(free_port())}
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        cpus = len(os.sched_getaffinity(bus.children()[0]))
        assert str(max(1, cpus - 1)) == _go_maxprocs(bus)
    finally:
        assert 0 == bus.stop()
    bus.env["GOMAXPROCS"] = "3"  # the operator's own setting wins
    bus.start()
    try:
        assert "3" == _go_maxprocs(bus)
        answer = httpx.get(
            f"{bus.base}/callbacks/smspilot", params={"server_id": next(_ids), "status": 2}
        )
        assert "OK" == answer.text
    finally:
        assert 0 == bus.stop()


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({}, None),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ],
)
def test_a_containers_cpu_limit_bounds_the_embedded_servers_processors(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert limit == nats_server._cgroup_cpu_limit(tmp_path)


@contextlib.contextmanager
def _replica_b_behind_a_link(
    tmp_path: Path, **settings: str
) -> Iterator[tuple[NatsServer, HangingLink, dict[str, str], Smsbus, Smsbus]]:
    """Two replicas on one nats-server (SMSBUS_PUBLISH_TIMEOUT=PUBLISH_TIMEOUT, and `settings`):
    A straight to it, B through a HangingLink. On the way out both are killed if they still run,
    the link closed and the server stopped."""
    nats = NatsServer(tmp_path / "nats").start()
    link = HangingLink(nats.port)
    env = isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT=str(PUBLISH_TIMEOUT), **settings)
    a = Smsbus(env, tmp_path / "a")
    b = Smsbus({**env, "SMSBUS_NATS_URL": link.url}, tmp_path / "b")
    try:
        yield nats, link, env, a.start(), b.start()
    finally:
        for bus in (a, b):
            bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        link.close()
        nats.stop()


def test_a_callback_spooled_while_its_link_hung_carries_the_registration_once_published(
    tmp_path: Path,
) -> None:
    """Read your writes through a fault: replica A answers a registration 202, and replica B,
    whose network path to NATS hangs just before (its mirror never hears of the registration,
    its bucket read gets no answer), takes the message's callback: answered OK, its event
    spooled without the tracking data. Once B's path is back, the event it publishes from the
    spool carries the registration's phone and client_ref, stored once."""
    with _replica_b_behind_a_link(tmp_path) as (nats, link, env, a, b):
        server_id = str(next(_ids))
        link.hang()
        a.register(
            {"provider": "smspilot", "message_id": server_id, "phone": "+7 903 555-12-34",
             "client_ref": "order-77"}
        )  # fmt: skip
        with httpx.Client(base_url=b.base, timeout=15) as client:
            answer = call(client, server_id)
        assert (200, "OK") == (answer.status, answer.text)
        assert 1 == b.spool_depth()
        link.cut()
        wait_for(lambda: b.spool_depth() == 0, timeout=30, what="B's spool to drain")
        stored = read_stream(nats.url, env["SMSBUS_STREAM"], f"{b.prefix}.status.>")
        assert [("79035551234", "order-77")] == [
            (s.event["data"]["phone"], s.event["data"]["client_ref"]) for s in stored
        ]
        assert server_id == stored[0].event["data"]["message_id"]
        assert any(
            line.get("event") == "spooled events given their tracking data"
            for line in b.log_lines()
        )


def test_a_late_callback_read_while_its_replicas_reads_hung_carries_the_registration(
    tmp_path: Path,
) -> None:
    """Read your writes when only the bucket read fails: a registered message is final, so no
    mirror holds it any more; a later report of it reaches replica B, whose connection for bucket
    reads hangs while its main connection works. The callback is answered OK, and its event,
    held in the spool rather than published without the registration's data, is published with
    the phone and client_ref once B can read the bucket again."""
    with _replica_b_behind_a_link(tmp_path) as (nats, link, env, a, b):
        server_id = str(next(_ids))
        a.register(
            {"provider": "smspilot", "message_id": server_id, "phone": "+7 903 555-12-34",
             "client_ref": "order-77"}
        )  # fmt: skip
        with httpx.Client(base_url=a.base, timeout=15) as client:
            assert "OK" == call(client, server_id).text  # delivered: final, let go by mirrors
        written = _bucket_last(nats.url, f"{env['SMSBUS_STREAM']}_messages")
        wait_for(
            lambda: b.readyz()["watches"]["state-mirror"]["last_sequence"] >= written,
            timeout=10, what="B's mirror to apply the final state",
        )  # fmt: skip
        link.hang("smsbus-reads")
        with httpx.Client(base_url=b.base, timeout=15) as client:
            late = client.get(
                "/callbacks/smspilot", params={"server_id": server_id, "status": -1, "error": 600}
            )
        assert (200, "OK") == (late.status_code, late.text)
        assert 1 == b.metric("smsbus_state_reads_failed_total")
        link.cut("smsbus-reads")
        subject = f"{b.prefix}.status.>"
        wait_for(lambda: len(read_stream(nats.url, env["SMSBUS_STREAM"], subject)) == 2,
                 timeout=30, what="both events in the stream")  # fmt: skip
        wait_for(lambda: b.spool_depth() == 0, timeout=30, what="B's spool to drain")
        stored = read_stream(nats.url, env["SMSBUS_STREAM"], subject)
        assert [("delivered", "79035551234", "order-77"), ("expired", "79035551234", "order-77")] \
            == [(s.event["data"]["status"], s.event["data"]["phone"],
                 s.event["data"]["client_ref"]) for s in stored]  # fmt: skip


def test_a_spooled_fact_recorded_elsewhere_waits_past_the_window_for_a_readable_state(
    tmp_path: Path,
) -> None:
    """Exactly once past the window when only bucket reads fail: replica B, cut off from NATS,
    spools a report of a registered message; the same report reaches replica A, which stores it
    and records it in the state. Longer than the duplicate window later B's path comes back,
    except for its bucket reads. B's drainer cannot tell whether the state records the fact, so
    the event waits in the spool (JetStream would store it again now) until the state can be read,
    and is then dropped: the stream holds the fact once."""
    window = 2.0
    with _replica_b_behind_a_link(tmp_path, SMSBUS_DUPLICATE_WINDOW=str(window)) as (
        nats, link, env, a, b,
    ):  # fmt: skip
        server_id = str(next(_ids))
        a.register({"provider": "smspilot", "message_id": server_id, "phone": "79035551234"})
        written = _bucket_last(nats.url, f"{env['SMSBUS_STREAM']}_messages")
        wait_for(
            lambda: b.readyz()["watches"]["state-mirror"]["last_sequence"] >= written,
            timeout=10, what="B's mirror to hold the registration",
        )  # fmt: skip
        link.refuse()
        for bus in (b, a):
            with httpx.Client(base_url=bus.base, timeout=15) as client:
                assert (200, "OK") == (lambda r: (r.status, r.text))(call(client, server_id))
        assert 1 == b.spool_depth()
        time.sleep(window + 0.5)  # the scenario itself: JetStream has forgotten the id
        link.hang("smsbus-reads", new_ones_too=True)
        link.admit()

        def waiting() -> bool:
            return any(
                line.get("event") == "spooled facts wait for their state to be readable"
                for line in b.log_lines()
            )

        def copies() -> int:
            stored = read_stream(nats.url, env["SMSBUS_STREAM"], f"{b.prefix}.status.>")
            return sum(1 for s in stored if s.event["subject"] == server_id)

        wait_for(lambda: waiting() or copies() > 1, timeout=30, what="B's drainer")
        assert (1, 1) == (copies(), b.spool_depth())
        link.cut("smsbus-reads")
        wait_for(lambda: b.spool_depth() == 0, timeout=30, what="B's spool to drain")
        assert 1 == copies()


def _bucket_last(url: str, bucket: str) -> int:
    async def last() -> int:
        nc = await nats_client.connect(url)
        try:
            info = await nc.jetstream().stream_info(f"KV_{bucket}")
            return int(info.state.last_seq)
        finally:
            await nc.close()

    return asyncio.run(last())


def test_a_stalled_bucket_read_is_counted_and_logged_and_the_callback_still_accepted(
    tmp_path: Path,
) -> None:
    """NATS connected but not answering (paused): a callback for a message the mirror does not
    hold cannot read the bucket within a second; it is still answered OK (its event spooled),
    and the failed read is counted and logged once, not passed over in silence."""
    with _bus_on_paused_nats(tmp_path) as (nats, bus):
        with httpx.Client(base_url=bus.base, timeout=30) as client:
            answers = [call(client, str(next(_ids))) for _ in range(2)]
        assert [(200, "OK")] * 2 == [(a.status, a.text) for a in answers]
        assert 2 == bus.metric("smsbus_state_reads_failed_total")
        warnings = [
            line for line in bus.log_lines()
            if line.get("event") == "state bucket not read in time; going on without the state"
        ]  # fmt: skip
        assert 1 == len(warnings)
        nats.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
