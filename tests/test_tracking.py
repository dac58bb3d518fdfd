"""Tracking: registrations over HTTP, the track subject and the CLI; current state in the bucket."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
from collections.abc import Iterator
from typing import Any

import nats
import orjson
import pytest

from bus.messages import MessageState, apply_status, parse_track_batch, register, restore
from tests.support import (
    SMSBUS,
    Listeners,
    NatsServer,
    Smsbus,
    isolated_env,
    read_stream,
    wait_for,
)

_ids = itertools.count(random.randrange(10**9, 10**10))


def new_id() -> str:
    return str(next(_ids))


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("tracking")).start()
    yield bus
    assert 0 == bus.stop()


@pytest.fixture
def client(service: Smsbus) -> Iterator[Listeners]:
    both = Listeners(service)
    yield both
    both.close()


def state(client: Listeners, provider: str, message_id: str) -> dict[str, Any] | None:
    response = client.get(f"/v1/messages/{provider}/{message_id}")
    return response.json() if response.status_code == 200 else None


def tracked_gauge(client: Listeners, provider: str) -> float:
    prefix = f'smsbus_tracked_messages{{provider="{provider}"}} '
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError("smsbus_tracked_messages is missing")


def test_register_one_and_read_it_back(client: Listeners) -> None:
    message_id = new_id()
    response = client.post(
        "/v1/messages",
        json={
            "provider": "smstower",
            "message_id": message_id,
            "phone": "+7 (903) 000-11-22",
            "client_ref": "order-1",
            "sent_at": "2026-11-22T13:00:00+03:00",
        },
    )
    assert (202, {"accepted": 1}) == (response.status_code, response.json())
    shown = wait_for(lambda: state(client, "smstower", message_id), what="the state")
    assert {
        "provider": "smstower",
        "message_id": message_id,
        "status": None,
        "final": False,
        "provider_status": None,
        "phone": "79030001122",
        "client_ref": "order-1",
        "updated_at": shown["updated_at"],
        "traceparent": None,
    } == shown


def test_a_list_is_all_or_nothing(
    service: Smsbus, nats_server: NatsServer, client: Listeners
) -> None:
    good, other = new_id(), new_id()
    response = client.post(
        "/v1/messages",
        json=[
            {"provider": "smstower", "message_id": good},
            {"provider": "nosuch", "message_id": "1"},
            {"provider": "smstower", "message_id": "12x"},
            {"provider": "epochta", "message_id": other, "colour": "red"},
            {"provider": "smsc", "message_id": "5", "sent_at": "yesterday"},
        ],
    )
    assert 400 == response.status_code
    assert {
        "errors": [
            {
                "index": 1,
                "error": "provider must be one of smspilot, smstower, smspager, smsc, epochta",
            },
            {"index": 2, "error": "smstower message ids are whole numbers"},
            {"index": 3, "error": "unknown field 'colour'"},
            {"index": 4, "error": "sent_at is not RFC 3339 (e.g. 2026-11-22T10:00:00Z)"},
        ]
    } == response.json()
    stored = read_stream(nats_server.url, service.stream, f"{service.prefix}.track.>")
    assert [] == [s for s in stored if s.event.get("message_id") in (good, other)]


def test_a_thousand_registrations_of_the_largest_size_fit_in_one_request(
    service: Smsbus, client: Listeners
) -> None:
    ids = [new_id() for _ in range(1000)]
    items = [
        {"provider": "smspager", "message_id": f"{m}{'9' * (21 - len(m))}",
         "phone": "7" * 20, "client_ref": "\u0451" * 256,
         "sent_at": "2026-11-22T10:00:00.123+03:00"}
        for m in ids
    ]  # fmt: skip
    body = json.dumps(items, ensure_ascii=True).encode()  # every client_ref char as \\uXXXX
    assert len(body) > 1024 * 1024
    response = client.post("/v1/messages", content=body)
    assert (202, {"accepted": 1000}) == (response.status_code, response.json())
    too_big = client.post("/v1/messages", content=body + b" " * (2 * 1024 * 1024))
    assert (413, "request body exceeds 2097152 bytes") == (too_big.status_code, too_big.text)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "body is not JSON"),
        (b"[]", "no messages given"),
        (
            json.dumps([{"provider": "smsc", "message_id": "1"}] * 1001).encode(),
            "more than 1000 messages",
        ),
    ],
)
def test_bad_batches_are_400(client: Listeners, body: bytes, error: str) -> None:
    response = client.post("/v1/messages", content=body)
    assert (400, {"errors": [{"index": None, "error": error}]}) == (
        response.status_code,
        response.json(),
    )


def test_a_thousand_registrations_in_one_request(client: Listeners) -> None:
    ids = [new_id() for _ in range(1000)]
    response = client.post(
        "/v1/messages", json=[{"provider": "epochta", "message_id": f"m{i}"} for i in ids]
    )
    assert (202, {"accepted": 1000}) == (response.status_code, response.json())
    wait_for(lambda: state(client, "epochta", f"m{ids[-1]}"), what="the last registration")


def test_unknown_message_and_provider_are_404(client: Listeners) -> None:
    assert 404 == client.get("/v1/messages/smstower/1").status_code
    assert 404 == client.get("/v1/messages/nosuch/1").status_code


def test_callback_carries_client_ref_and_phone_of_a_tracked_message(
    service: Smsbus, nats_server: NatsServer, client: Listeners
) -> None:
    server_id = new_id()
    before = tracked_gauge(client, "smspilot")
    client.post(
        "/v1/messages",
        json={"provider": "smspilot", "message_id": server_id, "phone": "79131437355",
              "client_ref": "order-42"},
    )  # fmt: skip
    wait_for(lambda: tracked_gauge(client, "smspilot") > before, what="the index to see it")
    client.get("/callbacks/smspilot", params={"server_id": server_id, "status": 2})

    [item] = [
        s
        for s in read_stream(nats_server.url, service.stream, f"{service.prefix}.status.>")
        if s.event["subject"] == server_id
    ]
    assert ("order-42", "79131437355") == (
        item.event["data"]["client_ref"],
        item.event["data"]["phone"],
    )
    shown = wait_for(
        lambda: (s := state(client, "smspilot", server_id)) and s["final"] and s, what="final"
    )
    assert ("delivered", "2", "order-42") == (
        shown["status"],
        shown["provider_status"],
        shown["client_ref"],
    )
    wait_for(lambda: tracked_gauge(client, "smspilot") == before, what="the gauge to drop")


def test_final_status_never_goes_back_and_the_later_final_wins(client: Listeners) -> None:
    server_id = new_id()

    def callback(status: int) -> None:
        client.get("/callbacks/smspilot", params={"server_id": server_id, "status": status})

    def current() -> str | None:
        shown = state(client, "smspilot", server_id)
        return shown["provider_status"] if shown else None

    callback(2)
    wait_for(lambda: current() == "2", what="delivered")
    callback(1)  # a late "sent": published, but the state stays delivered
    callback(-1)  # a later final report wins
    wait_for(lambda: current() == "-1", what="undelivered")
    shown = state(client, "smspilot", server_id)
    assert shown is not None and ("undelivered", True) == (shown["status"], shown["final"])


def test_an_older_final_applied_late_does_not_undo_a_newer_one() -> None:
    def report(raw: str, status: str, at: str) -> dict[str, Any]:
        return {"provider": "smsc", "message_id": "7", "status": status, "final": True,
                "provider_status": raw, "occurred_at": at}  # fmt: skip

    read = apply_status(None, report("2", "read", "2026-11-22T10:00:05.000Z"), "f-read")
    # Redelivered out of order: "delivered" happened before "read" and must not replace it.
    late = apply_status(read, report("1", "delivered", "2026-11-22T10:00:01.000Z"), "f-delivered")
    assert "read" == late.status
    assert ("f-read", "f-delivered") == late.facts  # recorded all the same
    undelivered = report("20", "undelivered", "2026-11-22T10:00:09.000Z")
    assert "undelivered" == apply_status(read, undelivered, "f-undelivered").status
    # On a tie the report applied later wins.
    tie = report("1", "delivered", "2026-11-22T10:00:05.000Z")
    assert "delivered" == apply_status(read, tie, "f-tie").status


def test_a_fact_already_recorded_changes_nothing() -> None:
    sent = {"provider": "smspilot", "message_id": "7", "status": "sent", "final": False,
            "provider_status": "1", "occurred_at": "2026-11-22T10:00:01.000Z"}  # fmt: skip
    delivered = sent | {"status": "delivered", "final": True, "provider_status": "2",
                        "occurred_at": "2026-11-22T10:00:05.000Z"}  # fmt: skip
    state = apply_status(apply_status(None, sent, "a" * 64), delivered, "b" * 64)
    assert state.records("a" * 64) and state.records("b" * 64)
    assert state == apply_status(state, sent, "a" * 64)
    assert state == apply_status(state, delivered, "b" * 64)


def test_a_list_on_the_track_subject_registers_each_item_and_one_bad_item_refuses_all(
    service: Smsbus, nats_server: NatsServer, client: Listeners
) -> None:
    ids = [new_id() for _ in range(3)]
    refused = new_id()

    async def publish() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        subject = f"{service.prefix}.track.smstower"
        items = [{"message_id": i, "client_ref": f"r{i}"} for i in ids]  # the subject names it
        await js.publish(subject, orjson.dumps(items))
        await js.publish(subject, orjson.dumps([{"message_id": refused}, {"message_id": "x"}]))
        await nc.close()

    asyncio.run(publish())
    for message_id in ids:
        shown = wait_for(lambda m=message_id: state(client, "smstower", m), what="the item")
        assert f"r{message_id}" == shown["client_ref"]

    def letter() -> Any:
        found = read_stream(nats_server.url, service.stream, f"{service.prefix}.deadletter.>")
        return next((s for s in found if refused in s.event["data"]["raw"]["body"]), None)

    dead = wait_for(letter, what="the refused list as a dead letter")
    assert "1: smstower message ids are whole numbers" in dead.event["data"]["reason"]
    assert state(client, "smstower", refused) is None


def test_junk_on_the_track_subject_is_dead_lettered(
    service: Smsbus, nats_server: NatsServer
) -> None:
    async def publish() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish(f"{service.prefix}.track.smstower", b"\x00junk")
        await js.publish(
            f"{service.prefix}.track.smstower", b'{"message_id": "1", "provider": "smsc"}'
        )
        await nc.close()

    asyncio.run(publish())

    def letters() -> list[Any]:
        """This test's dead letters (the service is shared: others' are on the subject too)."""
        found = read_stream(nats_server.url, service.stream, f"{service.prefix}.deadletter.>")
        return [
            data
            for data in (s.event["data"] for s in found)
            if data["raw"]["path"] == f"{service.prefix}.track.smstower"
            and ("junk" in data["raw"]["body"] or '"smsc"' in data["raw"]["body"])
        ]

    found = wait_for(lambda: len(letters()) == 2 and letters(), what="two dead letters")
    assert [None, None] == [d["raw"]["method"] for d in found]
    assert "not JSON" in found[0]["reason"]
    assert "does not match the subject's 'smstower'" in found[1]["reason"]


def run_cli(service: Smsbus, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "SMSBUS_API_PORT": str(service.api_port),
           **service.env}  # fmt: skip
    return subprocess.run(
        [SMSBUS, *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_cli_track_and_status(service: Smsbus) -> None:
    """Both go through the private API, so the status right after the track shows it."""
    message_id = new_id()
    tracked = run_cli(service, "track", "smsc", message_id, "--client-ref", "cli-1")
    assert (0, "1") == (tracked.returncode, tracked.stdout.strip())
    result = run_cli(service, "status", "smsc", message_id)
    assert 0 == result.returncode, result.stderr
    body = json.loads(result.stdout)
    assert ("smsc", message_id, "cli-1", None) == (
        body["provider"],
        body["message_id"],
        body["client_ref"],
        body["status"],
    )
    unknown = run_cli(service, "status", "smsc", "1")
    assert (1, {"error": "unknown message"}) == (unknown.returncode, json.loads(unknown.stdout))
    bad = run_cli(service, "track", "smstower", "abc")
    assert (2, "smsbus: smstower message ids are whole numbers") == (
        bad.returncode,
        bad.stderr.strip(),
    )


def test_a_number_a_send_was_registered_with_is_known_before_its_first_status(
    service: Smsbus, client: Listeners
) -> None:
    """An SMSC or SMS-Pager send registered with its phone: that number is tracked, so asking
    for it (`/<id>/<phone>`, `smsbus status --phone`) gives its state, nothing known yet,
    rather than a 404 until the provider's first report of it."""
    send = new_id()
    tracked = run_cli(service, "track", "smsc", send, "--phone", "+380 50 123-45-67",
                      "--client-ref", "one-number")  # fmt: skip
    assert 0 == tracked.returncode, tracked.stderr
    shown = client.get(f"/v1/messages/smsc/{send}/380501234567")
    assert 200 == shown.status_code
    assert {
        "provider": "smsc",
        "message_id": send,
        "status": None,
        "final": False,
        "phone": "380501234567",
        "client_ref": "one-number",
    }.items() <= shown.json().items()
    result = run_cli(service, "status", "smsc", send, "--phone", "+380 50 123-45-67")
    assert (0, shown.json()) == (result.returncode, json.loads(result.stdout))
    other = run_cli(service, "status", "smsc", send, "--phone", "380501234568")
    assert (1, {"error": "unknown message"}) == (other.returncode, json.loads(other.stdout))
    assert 404 == client.get(f"/v1/messages/smsc/{send}/380501234568").status_code
    one_id = run_cli(service, "status", "smspilot", send, "--phone", "380501234567")
    assert 2 == one_id.returncode and "--phone is for a number of an SMS-Pager or SMSC send" in (
        one_id.stderr
    )


TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OWN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_senders_trace_leads_to_the_delivery_report(
    service: Smsbus, nats_server: NatsServer, client: Listeners
) -> None:
    """A `traceparent` on POST /v1/messages (or one of an item's own) is kept with the
    registration and sent on the message's status events: NATS header and CloudEvents
    attribute. One that is not W3C Trace Context is ignored, never a reason to refuse."""
    header, own, bad = new_id(), new_id(), new_id()
    accepted = client.post(
        "/v1/messages",
        json=[{"provider": "smspilot", "message_id": header},
              {"provider": "smspilot", "message_id": own, "traceparent": OWN}],
        headers={"traceparent": TRACE},
    )  # fmt: skip
    assert accepted.status_code == 202
    ignored = client.post(
        "/v1/messages",
        json={"provider": "smspilot", "message_id": bad},
        headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
    )
    assert ignored.status_code == 202
    refused = client.post(
        "/v1/messages", json={"provider": "smspilot", "message_id": bad, "traceparent": "x"}
    )
    assert refused.status_code == 400 and "traceparent" in refused.json()["errors"][0]["error"]
    assert (state(client, "smspilot", header) or {})["traceparent"] == TRACE
    assert (state(client, "smspilot", bad) or {})["traceparent"] is None
    for server_id in (header, own, bad):
        client.get("/callbacks/smspilot", params={"server_id": server_id, "status": 2})

    stored = {
        s.event["subject"]: s
        for s in read_stream(nats_server.url, service.stream, f"{service.prefix}.status.>")
    }
    for server_id, trace in ((header, TRACE), (own, OWN)):
        assert stored[server_id].headers.get("traceparent") == trace
        assert stored[server_id].event["traceparent"] == trace
    assert "traceparent" not in stored[bad].headers
    assert "traceparent" not in stored[bad].event


def test_a_first_registration_is_the_state_a_registration_onto_nothing_makes() -> None:
    item = parse_track_batch(
        b'{"provider": "smsc", "message_id": "7", "phone": "380501234567", "client_ref": "r-1",'
        b' "sent_at": "2026-12-01T10:00:00Z"}'
    )[0]
    fresh = register(None, item, "2026-12-01T10:00:01.000Z")
    onto_empty = register(MessageState("smsc", "7"), item, "2026-12-01T10:00:01.000Z")
    assert fresh == onto_empty
    bare = parse_track_batch(b'{"provider": "smsc", "message_id": "8"}')[0]
    assert register(None, bare, "t") == register(MessageState("smsc", "8"), bare, "t")


def test_a_state_written_back_keeps_the_registration_the_facts_and_the_later_final() -> None:
    """What a replica held when its bucket lost it, put back into what the bucket has by then
    (bus.messages.restore): the registration from the one that has it, the facts of both, a
    final status over one that is not, and putting back what is there changes nothing."""
    item = parse_track_batch(b'{"provider": "smspilot", "message_id": "7", "client_ref": "r-7"}')[0]
    sent = {"provider": "smspilot", "message_id": "7", "status": "sent", "final": False,
            "provider_status": "1", "occurred_at": "2026-12-07T10:00:01.000Z"}  # fmt: skip
    delivered = sent | {"status": "delivered", "final": True, "provider_status": "2",
                        "occurred_at": "2026-12-07T10:00:05.000Z"}  # fmt: skip
    held = apply_status(register(None, item, "2026-12-07T10:00:00.000Z"), delivered, "d" * 64)
    # A late "sent" reported after the loss, before the write-back: no registration, not final.
    since = apply_status(None, sent, "s" * 64)
    back = restore(since, held)
    assert (True, "r-7", "delivered", True) == (back.tracked, back.client_ref, back.status,
                                                back.final)  # fmt: skip
    assert back.records("d" * 64) and back.records("s" * 64)
    assert back == restore(back, held) == restore(None, back)  # another replica's write-back
    assert held == restore(None, held)
    # A final reported after the loss and later than the one held wins; so does the bucket's
    # copy on a tie.
    undelivered = delivered | {"status": "undelivered", "provider_status": "-1",
                               "occurred_at": "2026-12-07T10:00:09.000Z"}  # fmt: skip
    assert "undelivered" == restore(apply_status(None, undelivered, "u" * 64), held).status
    tie = undelivered | {"occurred_at": delivered["occurred_at"]}
    assert "undelivered" == restore(apply_status(None, tie, "t" * 64), held).status
    # An SMS-Pager mailing: each number's final status over one that is not.
    pager = MessageState(
        "smspager",
        "55",
        numbers={
            "1": {"status": "delivered", "final": True},
            "2": {"status": "sent", "final": False},
        },
    )
    later = MessageState(
        "smspager",
        "55",
        numbers={
            "1": {"status": "sent", "final": False},
            "2": {"status": "delivered", "final": True},
        },
    )
    merged = restore(later, pager)
    assert merged.final and {"1": True, "2": True} == {
        phone: number["final"] for phone, number in (merged.numbers or {}).items()
    }


UNPOLLED = "messages tracked for a provider this replica does not poll"


def test_messages_tracked_for_a_provider_nobody_here_polls_are_warned_of(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A registration for a provider whose credentials are not set is accepted (they may be set
    later, or another replica holds them), and warned of: nothing here will poll or expire it.
    Not for SMSPilot, whose statuses come by callback."""

    def warned(bus: Smsbus) -> dict[str, float]:
        return {
            line["provider"]: line["tracked"]
            for line in bus.log_lines()
            if line.get("event", "").startswith(UNPOLLED)
        }

    env = isolated_env(nats_server.url)
    bus = Smsbus(env, tmp_path_factory.mktemp("unpolled")).start()
    try:
        bus.register({"provider": "smspilot", "message_id": new_id()})
        bus.register({"provider": "smstower", "message_id": new_id()})
        wait_for(lambda: warned(bus), what="the warning")
        bus.register({"provider": "smstower", "message_id": new_id()})

        async def track() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                body = orjson.dumps({"provider": "epochta", "message_id": "msg-1"})
                await nc.jetstream().publish(f"{bus.prefix}.track.epochta", body)
            finally:
                await nc.close()

        asyncio.run(track())
        wait_for(lambda: "epochta" in warned(bus), what="the warning of sms.track's")
        assert {"smstower": 1, "epochta": 1} == warned(bus)  # once an hour, at most
        assert 1 == sum(UNPOLLED in line for line in bus.logs().splitlines() if "smstower" in line)
    finally:
        assert 0 == bus.stop()
    bus = Smsbus(env, tmp_path_factory.mktemp("unpolled")).start()
    try:  # what is tracked is warned of at start
        found = wait_for(lambda: len(warned(bus)) == 2 and warned(bus), what="both warnings")
        assert {"smstower": 2, "epochta": 1} == found
    finally:
        assert 0 == bus.stop()
