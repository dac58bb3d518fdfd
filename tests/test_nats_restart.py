"""A single nats-server SIGKILLed and started again (an external one, and the embedded one that
smsbus restarts itself): the state mirror, the projector and polling follow it at once, a message
registered just after the restart is polled and its events carry its tracking data, and no state
change is skipped."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import (
    NatsServer,
    Smsbus,
    Stored,
    free_port,
    isolated_env,
    read_stream,
    wait_for,
)

pytestmark = pytest.mark.slow
INTERVAL = 0.5
_ids = itertools.count(random.randrange(10**8, 10**9))


def new_id() -> str:
    return str(next(_ids))


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(5) == b"INFO "
    except OSError:
        return False


def asked(tower: FakeSmstower, message_id: str) -> float | None:
    """When the fake was first asked about `message_id` (its loop's clock), or None."""
    for request in tower.seen("/getstatus.v2.php"):
        if message_id in request.form.get("messageid", "").split(","):
            return request.at
    return None


def callback(bus: Smsbus, server_id: str, status: int) -> None:
    answer = httpx.get(
        f"{bus.base}/callbacks/smspilot", params={"server_id": server_id, "status": status}
    )
    assert (200, "OK") == (answer.status_code, answer.text)


def tracking(url: str, bus: Smsbus) -> Callable[[str], list[Stored]]:
    def of(message_id: str) -> list[Stored]:
        stored = read_stream(url, bus.stream, f"{bus.prefix}.status.>")
        return [s for s in stored if s.event["subject"] == message_id]

    return of


@pytest.mark.parametrize("topology", ["external", "embedded"])
def test_everything_follows_a_restarted_nats_server(topology: str, tmp_path: Path) -> None:
    tower = FakeSmstower()
    with Served(tower.app) as fake:
        settings = {**tower.settings(fake.url, INTERVAL), "SMSBUS_PUBLISH_TIMEOUT": "1"}
        nats: NatsServer | None = None
        if topology == "external":
            nats = NatsServer(tmp_path / "nats").start()
            env = isolated_env(nats.url, **settings)
            port = nats.port
        else:
            port = free_port()
            env = {"SMSBUS_EMBEDDED_NATS_PORT": str(port), **settings}
        url = f"nats://127.0.0.1:{port}"
        bus = Smsbus(env, tmp_path / "bus").start()
        events = tracking(url, bus)
        try:
            before = new_id()
            pilot_before = new_id()
            tower.statuses[before] = ("processing", "")
            bus.register(
                {"provider": "smstower", "message_id": before, "client_ref": "r-before"},
                {"provider": "smspilot", "message_id": pilot_before, "client_ref": "p-before"},
            )
            wait_for(lambda: len(events(before)) == 1, what="the first poll")

            if nats is not None:
                nats.kill(signal.SIGKILL)
                nats.start()
            else:
                [server] = bus.children()
                os.kill(server, signal.SIGKILL)
                wait_for(lambda: bus.children() and bus.children() != [server], timeout=15,
                         what="smsbus to start its nats-server again")  # fmt: skip
                wait_for(lambda: accepts(port), timeout=15, what="the restarted nats-server")
            restarted = time.monotonic()
            tower.statuses[before] = ("delivered", msk_now())  # a change while it was away

            # The watch and the consumer are back within a second or two, and say so.
            def following() -> bool:
                watches = bus.readyz().get("watches", {})
                return all(w.get("state") == "following" for w in watches.values()) and bool(
                    watches
                )

            wait_for(following, timeout=5, what="the watches to follow the new server")
            followed = time.monotonic() - restarted

            time.sleep(1.0)  # the scenario: a message registered a second after the restart
            after, pilot_after = new_id(), new_id()
            tower.statuses[after] = ("processing", "")
            registered = bus.register(
                {"provider": "smstower", "message_id": after, "phone": "79030001122",
                 "client_ref": "r-after"},
                {"provider": "smspilot", "message_id": pilot_after, "client_ref": "p-after"},
            )  # fmt: skip
            first_ask = wait_for(lambda: asked(tower, after), timeout=INTERVAL + 5,
                                 what="the new message to be polled")  # fmt: skip
            polled_after = first_ask - registered  # the fake's loop clock is time.monotonic
            assert polled_after <= INTERVAL + 2, f"first poll {polled_after:.2f} s after 202"

            # Its event, and callbacks for messages registered before and after, carry the
            # tracking data; the change made during the outage is not skipped.
            [event] = wait_for(lambda: events(after), what="the new message's event")
            assert ("r-after", "79030001122") == (
                event.event["data"]["client_ref"],
                event.event["data"]["phone"],
            )
            callback(bus, pilot_after, 2)
            callback(bus, pilot_before, 2)
            for message_id, ref in ((pilot_after, "p-after"), (pilot_before, "p-before")):
                [stored] = wait_for(lambda m=message_id: events(m), what="the callback's event")
                assert ref == stored.event["data"]["client_ref"]
            statuses = lambda: [e.event["data"]["status"] for e in events(before)]  # noqa: E731
            wait_for(lambda: statuses() == ["sent", "delivered"], what="the outage's change")
            body = bus.readyz()
            assert [] == body["degraded"], body
            if topology == "embedded":
                assert body["tasks"]["embedded-nats"]["restarts"] >= 1
                assert bus.metric("smsbus_task_restarts_total", task="embedded-nats") >= 1
            print(f"{topology}: watches following {followed:.2f} s after the restart; "
                  f"new message polled {polled_after:.2f} s after its 202")  # fmt: skip
            assert 0 == bus.stop()
        finally:
            if bus.proc is not None and bus.proc.poll() is None:
                bus.kill()
            if nats is not None:
                nats.stop()
