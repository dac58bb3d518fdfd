"""Registrations written as atomic batches of state writes (bus.state), with two replicas on one
NATS: a batch the server refuses as a whole is written again key by key and loses nothing, and
two replicas registering the same messages at once both keep what they brought, and a message
registered on one replica as its report reaches the other keeps both."""

from __future__ import annotations

import collections
import itertools
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

pytestmark = pytest.mark.slow
_ids = itertools.count(random.randrange(10**8, 10**9))


@pytest.fixture(scope="module")
def pair(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Smsbus]]:
    env, root = isolated_env(nats_server.url), tmp_path_factory.mktemp("batches")
    buses = [Smsbus(env, root / name).start() for name in ("a", "b")]
    yield buses
    for bus in buses:
        assert 0 == bus.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def state(http: httpx.Client, bus: Smsbus, provider: str, message_id: str) -> dict[str, Any] | None:
    answer = http.get(f"{bus.api}/v1/messages/{provider}/{message_id}")
    return answer.json() if answer.status_code == 200 else None


def register(bus: Smsbus, items: list[dict[str, Any]]) -> None:
    answer = httpx.post(f"{bus.api}/v1/messages", json=items, timeout=30)  # a thread's own
    assert (202, {"accepted": len(items)}) == (answer.status_code, answer.json())


def test_a_batch_refused_for_a_key_the_mirror_let_go_is_written_key_by_key(
    pair: list[Smsbus], http: httpx.Client
) -> None:
    bus = pair[0]
    # A delivered SMSPilot message: final, so the mirror lets it go (no poll asks about it
    # again), while the bucket keeps its state at some revision.
    known = str(next(_ids))
    register(bus, [{"provider": "smspilot", "message_id": known, "phone": "79130000001"}])
    answer = http.get(f"{bus.base}/callbacks/smspilot", params={"server_id": known, "status": 2})
    assert "OK" == answer.text
    wait_for(lambda: (s := state(http, bus, "smspilot", known)) and s["final"], what="the final")
    stored = bus.metric("smsbus_state_batches_total", outcome="stored")
    refused = bus.metric("smsbus_state_batches_total", outcome="refused")

    # The sending app registers it again among 599 new ones: 600 writes, 3 atomic batches;
    # the one holding `known` expects no value there and is refused as a whole.
    fresh = [str(next(_ids)) for _ in range(599)]
    items = [
        {"provider": "smspilot", "message_id": m, "client_ref": f"order-{m}"}
        for m in [*fresh[:300], known, *fresh[300:]]
    ]
    register(bus, items)

    assert bus.metric("smsbus_state_batches_total", outcome="refused") == refused + 1
    assert bus.metric("smsbus_state_batches_total", outcome="stored") == stored + 2
    again = state(http, bus, "smspilot", known)
    assert again is not None
    assert (True, "delivered", "79130000001", f"order-{known}") == (
        again["final"], again["status"], again["phone"], again["client_ref"]
    )  # fmt: skip
    for m in fresh:
        shown = state(http, pair[1], "smspilot", m)  # the other replica reads it too
        assert shown is not None and f"order-{m}" == shown["client_ref"]


def test_two_replicas_registering_the_same_messages_at_once_both_keep_theirs(
    pair: list[Smsbus], http: httpx.Client
) -> None:
    ids = [str(next(_ids)) for _ in range(1000)]
    a, b = pair
    phones = [{"provider": "smstower", "message_id": m, "phone": f"7913{m[-7:]}"} for m in ids]
    refs = [{"provider": "smstower", "message_id": m, "client_ref": f"ref-{m}"} for m in ids]
    # Each replica's mirror learns of the other's writes only when its watch delivers them, so
    # their batches meet keys that moved under them.
    rounds = [(a, phones[:500]), (b, refs[:500]), (a, refs[500:]), (b, phones[500:])]
    errors: list[BaseException] = []

    def run(bus: Smsbus, items: list[dict[str, Any]]) -> None:
        try:
            register(bus, items)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=r) for r in rounds]
    threads += [threading.Thread(target=run, args=(b if bus is a else a, items))
                for bus, items in rounds]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [] == errors
    for m in ids:
        shown = state(http, a, "smstower", m)
        assert shown is not None
        assert (f"7913{m[-7:]}", f"ref-{m}") == (shown["phone"], shown["client_ref"]), m


def test_a_registration_and_its_report_at_once_on_two_replicas_keep_both(
    nats_server: NatsServer, pair: list[Smsbus], http: httpx.Client
) -> None:
    """SMSPilot may report a message before its sender has registered it: here each message's
    registration (on one replica) and its delivery report (on the other) are sent at the same
    moment, so either may come first. The state ends with the report's final status and the
    registration's phone and client_ref (a registration after the final report leaves the
    message final, not open to polling), and the event is stored once."""
    a, b = pair
    ids = [str(next(_ids)) for _ in range(150)]
    together = threading.Barrier(2)
    errors: list[BaseException] = []

    def each(send: Any) -> None:
        try:
            with httpx.Client(timeout=30) as client:
                for message_id in ids:
                    together.wait(timeout=30)
                    send(client, message_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            together.abort()

    def registration(client: httpx.Client, message_id: str) -> None:
        item = {"provider": "smspilot", "message_id": message_id,
                "phone": f"7903{message_id[-7:]}", "client_ref": f"order-{message_id}"}  # fmt: skip
        answer = client.post(f"{a.api}/v1/messages", json=item)
        assert (202, {"accepted": 1}) == (answer.status_code, answer.json())

    def report(client: httpx.Client, message_id: str) -> None:
        b.callback(client, message_id, 2)

    threads = [threading.Thread(target=each, args=(send,)) for send in (registration, report)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [] == errors
    for message_id in ids:
        shown = state(http, a, "smspilot", message_id)
        assert shown is not None
        assert ("delivered", True, f"7903{message_id[-7:]}", f"order-{message_id}") == (
            shown["status"],
            shown["final"],
            shown["phone"],
            shown["client_ref"],
        ), shown
    wanted = set(ids)
    events = [
        item.event["data"]
        for item in read_stream(nats_server.url, b.stream, f"{b.prefix}.status.smspilot.>")
        if item.event["data"]["message_id"] in wanted
    ]
    assert dict.fromkeys(ids, 1) == dict(collections.Counter(e["message_id"] for e in events))
    # The race went both ways: some reports met their registration (their event carries the
    # phone; about one in eight here), the others came first.
    after = sum(1 for e in events if e.get("phone"))
    assert 0 < after < len(ids), f"{after} of {len(ids)} reports came after the registration"
