"""Three smsbus replicas on a 3-node NATS cluster (R3 stream and buckets) under callback load,
with pollers running: kill -9 the poller leader and a NATS node. Every callback answered OK is
stored exactly once (the killed replica, started again on its data directory, publishes what it
had spooled), the pollers move within the lease TTL and carry on, SMSC never refuses."""

from __future__ import annotations

import collections
import itertools
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fakes.server import Served
from tests.fakes.smsc import FakeSmsc
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import NatsCluster, Smsbus, isolated_env, read_stream, wait_for
from tests.test_subscriber import Subscriber, handled, rows

pytestmark = pytest.mark.slow
LEASE_TTL = 12.0  # next to a NATS node's death, a Raft election can take seconds
_ids = itertools.count(random.randrange(10**9, 10**10))


def leads(bus: Smsbus, provider: str) -> bool:
    try:
        body = httpx.get(f"{bus.base}/readyz", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return False
    return bool(body["providers"].get(provider, {}).get("leader"))


class Load:
    """Callbacks with unique server_ids, spread over the replicas, until stopped."""

    def __init__(self, buses: list[Smsbus]) -> None:
        self.buses = buses
        self.ok: list[str] = []
        self.failed = 0
        self.slowest = 0.0  # s: the longest a callback waited for its answer
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]
        for thread in self._threads:
            thread.start()

    def _run(self, offset: int) -> None:
        clients = [httpx.Client(base_url=b.base, timeout=10) for b in self.buses]
        n = offset
        while not self._stop.is_set():
            n += 1
            server_id = str(next(_ids))
            sent = time.monotonic()
            try:
                response = clients[n % len(clients)].get(
                    "/callbacks/smspilot", params={"server_id": server_id, "status": 2}
                )
                self.slowest = max(self.slowest, time.monotonic() - sent)
                if (response.status_code, response.text) == (200, "OK"):
                    self.ok.append(server_id)
                else:
                    self.failed += 1
            except httpx.TransportError:
                self.failed += 1  # the killed replica: never answered OK, never promised
        for client in clients:
            client.close()

    def wait_more(self, n: int) -> None:
        target = len(self.ok) + n
        wait_for(lambda: len(self.ok) >= target, timeout=30, what=f"{n} more OK answers")

    def stop(self) -> list[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.ok


def _audit(
    cluster: NatsCluster, bus: Smsbus, answered: list[str]
) -> tuple[int, list[str], list[str]]:
    """Of the callbacks answered `OK`: how many events are stored, and which are missing or
    stored more than once."""
    found = read_stream(cluster.urls, bus.stream, f"{bus.prefix}.status.smspilot.>")
    stored = collections.Counter(e.event["data"]["message_id"] for e in found)
    missing = [i for i in answered if i not in stored]
    return sum(stored.values()), missing, [i for i, n in stored.items() if n > 1]


def test_cluster_survives_losing_the_leader_and_a_nats_node(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path / "nats").start()
    tower, smsc = FakeSmstower(), FakeSmsc()
    buses: list[Smsbus] = []
    try:
        with Served(tower.app) as t, Served(smsc.app) as s:
            env = isolated_env(
                ",".join(cluster.urls),
                SMSBUS_STREAM_REPLICAS="3",
                SMSBUS_LEASE_TTL=str(LEASE_TTL),
                SMSBUS_PUBLISH_TIMEOUT="1",
                **tower.settings(t.url),
                SMSBUS_SMSC_URL=s.url,
                SMSBUS_SMSC_LOGIN=smsc.login,
                SMSBUS_SMSC_PASSWORD=smsc.password,
                SMSBUS_SMSC_INTERVAL="21",
            )
            buses = [Smsbus(env, tmp_path / f"bus{i}").start() for i in range(3)]
            leader = wait_for(
                lambda: next((b for b in buses if leads(b, "smstower")), None),
                what="an SMSTOWER leader",
            )
            message = str(next(_ids))
            tower.statuses[message] = ("processing", "")
            httpx.post(f"{buses[0].api}/v1/messages",
                       json={"provider": "smstower", "message_id": message})  # fmt: skip

            def statuses() -> list[str]:
                found = read_stream(cluster.urls, buses[0].stream,
                                    f"{buses[0].prefix}.status.smstower.>")  # fmt: skip
                return [e.event["data"]["status"] for e in found if e.event["subject"] == message]

            wait_for(lambda: statuses() == ["sent"], what="the first poll")

            load = Load(buses)
            load.wait_more(200)
            leader.kill()
            killed_at = time.monotonic()
            survivors = [b for b in buses if b is not leader]
            cluster.kill(1)  # and a NATS node
            new_leader = wait_for(
                lambda: next((b for b in survivors if leads(b, "smstower")), None),
                timeout=LEASE_TTL + 10,
                what="a new SMSTOWER leader",
            )
            took = time.monotonic() - killed_at
            load.wait_more(300)
            tower.statuses[message] = ("delivered", msk_now())
            wait_for(lambda: statuses() == ["sent", "delivered"], timeout=20,
                     what="polling after the takeover")  # fmt: skip
            answered = load.stop()

            # The killed replica comes back on its data directory, as a restarted container
            # does, and publishes what it answered OK from its spool, if anything.
            leader.start()

            def spools_empty() -> bool:
                return all(b.spool_depth() == 0 for b in buses)

            wait_for(spools_empty, timeout=30, what="the spools to drain")
            stored, missing, doubled = _audit(cluster, buses[0], answered)
            print(
                f"\ncluster: {len(answered)} callbacks answered OK, {load.failed} failed "
                f"(the killed replica), {stored} stored, {len(missing)} missing, "
                f"{len(doubled)} doubled; takeover {took:.1f} s"
            )
            assert ([], []) == (missing, doubled), f"{len(missing)} missing, {len(doubled)} doubled"
            assert took <= LEASE_TTL, f"takeover took {took:.1f} s"
            assert new_leader is not leader
            assert 0 == smsc.refused
    finally:
        for bus in buses:
            if bus.proc is not None and bus.proc.poll() is None:
                bus.stop()
        cluster.stop()


def test_a_replica_given_one_server_of_a_cluster_with_users_fails_over_to_the_others(
    tmp_path: Path,
) -> None:
    """One URL, with a user and password, as a Service name gives: nats-py learns the cluster's
    other servers from it, without credentials. When the one given dies, smsbus goes on with
    the others, the user and password given to them too (nats-py alone sent them nothing:
    'Authorization Violation', never ready again), and nothing answered is lost."""
    cluster = NatsCluster(tmp_path / "nats", user=("smsbus", "cluster-s3cret")).start()
    env = isolated_env(cluster.urls[0], SMSBUS_STREAM_REPLICAS="3", SMSBUS_PUBLISH_TIMEOUT="1")
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        with httpx.Client(base_url=bus.base, timeout=10) as http:
            ok = http.get("/callbacks/smspilot", params={"server_id": "4242601", "status": 2})
            assert "OK" == ok.text
            cluster.kill(0)
            wait_for(lambda: bus.reconnections() >= 2, timeout=30,
                     what="both connections on another server")  # fmt: skip
            wait_for(bus.ready, timeout=30, what="smsbus ready on the others")
            ok = http.get("/callbacks/smspilot", params={"server_id": "4242602", "status": 2})
            assert "OK" == ok.text
        wait_for(lambda: bus.spool_depth() == 0, timeout=30, what="the spool to drain")
        stored = read_stream(cluster.urls[1:], bus.stream, f"{bus.prefix}.status.>")
        assert ["4242601", "4242602"] == [item.event["subject"] for item in stored]
        assert "cluster-s3cret" not in bus.logs()
        assert 0 == bus.stop()
    finally:
        bus.kill()
        cluster.stop()


def test_a_rolling_restart_of_nats_in_lame_duck_mode_loses_nothing(tmp_path: Path) -> None:
    """NATS upgraded as its Helm chart does it: one node after another is put into lame duck
    mode (it hands its leaderships over, stops its JetStream, closes its clients and exits) and
    started again, each once the cluster is whole. Two replicas under callback load, one given
    every server and one only the first to go, the SMSTOWER poller following a message
    registered before each node goes. Every callback is answered `OK` in time, none refused;
    each is stored once; each message's statuses come once, with its registration's data; no
    background task fails."""
    cluster = NatsCluster(tmp_path / "nats").start()
    tower = FakeSmstower()
    buses: list[Smsbus] = []
    subscriber: Subscriber | None = None
    try:
        with Served(tower.app) as t:
            env = isolated_env(",".join(cluster.urls), SMSBUS_STREAM_REPLICAS="3",
                               **tower.settings(t.url, interval=1))  # fmt: skip
            buses = [
                Smsbus(env, tmp_path / "bus0").start(),
                Smsbus({**env, "SMSBUS_NATS_URL": cluster.urls[0]}, tmp_path / "bus1").start(),
            ]
            bus = buses[0]
            wait_for(lambda: any(leads(b, "smstower") for b in buses), what="an SMSTOWER leader")

            def statuses() -> dict[str, list[tuple[str, str | None]]]:
                found: dict[str, list[tuple[str, str | None]]] = collections.defaultdict(list)
                for e in read_stream(cluster.urls, bus.stream, f"{bus.prefix}.status.smstower.>"):
                    data = e.event["data"]
                    found[data["message_id"]].append((data["status"], data["client_ref"]))
                return found

            # The example subscriber, given the first server to go, as a Service name gives one.
            db = tmp_path / "app.sqlite3"
            subscriber = Subscriber(buses[1], db, tmp_path / "subscriber.log")
            load, began = Load(buses), time.monotonic()
            messages = []
            for i in range(len(cluster.ports)):
                load.wait_more(200)
                message = str(next(_ids))
                messages.append(message)
                tower.statuses[message] = ("processing", "")
                buses[i % 2].register({"provider": "smstower", "message_id": message,
                                       "client_ref": f"order-{message}"})  # fmt: skip
                cluster.lame_duck(i)
                cluster.start_node(i)
                wait_for(
                    lambda: cluster.settled(bus.streams), timeout=60, what=f"n{i} current again"
                )
                # Delivered once the server is back: `processing` lasts through the restart, so
                # it is seen whatever the timing of the polls. A poller sees a status only if it
                # lasts until a poll, and with `processing` for the 3 s of the lame duck alone, a
                # first poll put off by the restart (the registration made on the other replica)
                # came after it in about one run in five under load.
                tower.statuses[message] = ("delivered", msk_now())
            load.wait_more(200)
            answered = load.stop()
            took = time.monotonic() - began

            def polled() -> bool:
                found = statuses()
                return all(len(found[m]) >= 2 for m in messages)

            wait_for(polled, timeout=30, what="every message's final status")
            wait_for(lambda: all(b.spool_depth() == 0 for b in buses), timeout=30,
                     what="the spools to drain")  # fmt: skip
            stored, missing, doubled = _audit(cluster, bus, answered)
            spooled = sum(b.metric("smsbus_publish_failures_total") for b in buses)
            print(
                f"\nrolling restart: {len(answered)} callbacks answered OK in {took:.1f} s, "
                f"{load.failed} not, "
                f"slowest {load.slowest:.2f} s, {spooled:.0f} through the spool; "
                f"{stored} stored, {len(missing)} missing, {len(doubled)} doubled"
            )
            assert (0, [], []) == (load.failed, missing, doubled)
            assert load.slowest < 5, f"a callback waited {load.slowest:.1f} s for its answer"
            wanted = {m: [("sent", f"order-{m}"), ("delivered", f"order-{m}")] for m in messages}
            assert wanted == {m: statuses()[m] for m in messages}
            everything = read_stream(cluster.urls, bus.stream, f"{bus.prefix}.status.>")
            facts = {e.event["id"] for e in everything}
            wait_for(lambda: handled(db) == facts, timeout=60, what="the subscriber to catch up")
            assert 0 == subscriber.stop(signal.SIGTERM)
            applied = {message: row[2] for message, row in rows(db).items()}  # facts applied
            assert {**dict.fromkeys(answered, 1), **dict.fromkeys(messages, 2)} == applied
            for b in buses:
                said = [line["event"] for line in b.log_lines()]
                assert any(event.startswith("nats server stopping (lame duck") for event in said)
                ready = b.readyz()
                restarted = {
                    name: task["restarts"]
                    for name, task in ready["tasks"].items()
                    if task["restarts"]
                }
                assert ({}, []) == (restarted, ready["degraded"])
    finally:
        if subscriber is not None and subscriber.proc.poll() is None:
            subscriber.stop(signal.SIGKILL)  # a failure above must not leak it into another test
        for b in buses:
            if b.proc is not None and b.proc.poll() is None:
                b.stop()
        cluster.stop()


def test_a_cluster_that_loses_its_quorum_for_a_while_loses_nothing(tmp_path: Path) -> None:
    """Two of the three NATS servers down at once for longer than any timeout: JetStream stores
    nothing (no stream or bucket has a leader). Callbacks are still answered `OK`, from the
    spool; a registration is refused (`503`) rather than answered without being stored; the
    pollers stop. Once the servers are back, every callback is stored once, a message
    registered then is polled, and nothing stays degraded."""
    cluster = NatsCluster(tmp_path / "nats").start()
    tower = FakeSmstower()
    buses: list[Smsbus] = []
    try:
        with Served(tower.app) as t:
            env = isolated_env(",".join(cluster.urls), SMSBUS_STREAM_REPLICAS="3",
                               **tower.settings(t.url, interval=1))  # fmt: skip
            buses = [Smsbus(env, tmp_path / f"bus{i}").start() for i in range(2)]
            bus = buses[0]
            load = Load(buses)
            load.wait_more(200)
            cluster.kill(1)
            cluster.kill(2)
            lost = time.monotonic()
            load.wait_more(200)  # answered from the spools
            refused = httpx.post(f"{bus.api}/v1/messages", timeout=15,
                                 json={"provider": "smstower", "message_id": "1"})  # fmt: skip
            wait_for(lambda: time.monotonic() - lost > 15, timeout=20, what="15 s without quorum")
            during = len(load.ok)
            cluster.start_node(1)
            cluster.start_node(2)
            wait_for(lambda: cluster.settled(bus.streams), timeout=60, what="the cluster whole")
            message = str(next(_ids))
            tower.statuses[message] = ("delivered", msk_now())
            buses[1].register({"provider": "smstower", "message_id": message,
                               "client_ref": f"order-{message}"})  # fmt: skip
            load.wait_more(200)
            answered = load.stop()
            wait_for(lambda: all(b.spool_depth() == 0 for b in buses), timeout=60,
                     what="the spools to drain")  # fmt: skip

            def polled() -> list[tuple[str, str | None]]:
                found = read_stream(cluster.urls, bus.stream, f"{bus.prefix}.status.smstower.>")
                return [(e.event["data"]["status"], e.event["data"]["client_ref"])
                        for e in found if e.event["subject"] == message]  # fmt: skip

            wait_for(polled, timeout=30, what="the message registered after the outage polled")
            stored, missing, doubled = _audit(cluster, bus, answered)
            print(
                f"\nquorum lost for 15 s: {len(answered)} callbacks answered OK "
                f"({during} before the servers came back), {load.failed} not, slowest "
                f"{load.slowest:.2f} s; {stored} stored, {len(missing)} missing, "
                f"{len(doubled)} doubled; a registration meanwhile: {refused.status_code} "
                f"{refused.text}"
            )
            assert (0, [], []) == (load.failed, missing, doubled)
            assert load.slowest < 5, f"a callback waited {load.slowest:.1f} s for its answer"
            assert 503 == refused.status_code
            assert [("delivered", f"order-{message}")] == polled()
            wait_for(lambda: all([] == b.readyz()["degraded"] for b in buses), timeout=30,
                     what="every task and watch up")  # fmt: skip
    finally:
        for b in buses:
            if b.proc is not None and b.proc.poll() is None:
                b.stop()
        cluster.stop()
