"""SMSPilot callbacks end to end: a real `smsbus serve` on a real port, a real nats-server, and
the stream read back with nats-py."""

from __future__ import annotations

import itertools
import random
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import (
    NatsServer,
    Smsbus,
    Stored,
    events_by_id,
    isolated_env,
    read_stream,
    wait_for,
)

_ids = itertools.count(random.randrange(10**9, 10**10))


def new_id() -> str:
    return str(next(_ids))


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("svc")).start()
    yield bus
    assert bus.stop() == 0


@pytest.fixture
def client(service: Smsbus) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base, timeout=10) as c:
        yield c


def stored(service: Smsbus, nats_server: NatsServer, kind: str = "status") -> list[Stored]:
    return read_stream(nats_server.url, service.stream, f"{service.prefix}.{kind}.>")


def status_events(service: Smsbus, nats_server: NatsServer, server_id: str) -> list[Stored]:
    return [s for s in stored(service, nats_server) if s.event["subject"] == server_id]


# CONTRACT.md section 5, the smspilot row, and smspilot.txt's error table.
STATUS_ROWS = [
    ("-2", None, "rejected", True, None),
    ("-1", None, "undelivered", True, None),
    ("-1", "600", "expired", True, "Expired"),
    ("-1", "601", "undelivered", True, "Undeliverable"),
    ("-1", "602", "undelivered", True, "Destination unreachable"),
    ("-1", "603", "rejected", True, "Rejected"),
    ("-1", "604", "cancelled", True, "Cancelled"),  # smspilot.txt names no text
    ("0", "0", "queued", False, None),
    ("1", None, "sent", False, None),
    ("2", "0", "delivered", True, None),
    ("3", None, "scheduled", False, None),
    ("7", None, "unknown", False, None),
]


@pytest.mark.parametrize(("raw", "error", "status", "final", "error_text"), STATUS_ROWS)
def test_every_status_row_becomes_one_cloudevent(
    service: Smsbus,
    nats_server: NatsServer,
    client: httpx.Client,
    raw: str,
    error: str | None,
    status: str,
    final: bool,
    error_text: str | None,
) -> None:
    server_id = new_id()
    params = {"server_id": server_id, "status": raw}
    if error is not None:
        params["error"] = error
    response = client.get("/callbacks/smspilot", params=params)

    assert (200, "OK") == (response.status_code, response.text)
    assert response.headers["content-type"].startswith("text/plain")
    [item] = status_events(service, nats_server, server_id)
    assert f"{service.prefix}.status.smspilot.{status}" == item.subject
    assert item.event["id"] == item.headers["Nats-Msg-Id"]
    assert "application/cloudevents+json" == item.headers["Content-Type"]
    event = item.event
    assert {
        "specversion": "1.0",
        "source": "/smsbus/smspilot",
        "type": "sms.status",
        "subject": server_id,
        "datacontenttype": "application/json",
    } == {k: event[k] for k in ("specversion", "source", "type", "subject", "datacontenttype")}
    assert 64 == len(event["id"]) and int(event["id"], 16) >= 0
    data = event["data"]
    assert {
        "provider": "smspilot",
        "message_id": server_id,
        "phone": None,
        "client_ref": None,
        "status": status,
        "final": final,
        "provider_status": raw,
        "error_code": None if error in (None, "0") else error,
        "error": error_text,
        "via": "callback",
        "callback_params": {},
    } == {k: v for k, v in data.items() if k not in ("occurred_at", "received_at")}
    assert data["occurred_at"] == data["received_at"] == event["time"]
    assert event["time"].endswith("Z")


def test_post_form_body_and_query_are_both_read(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    server_id = new_id()
    response = client.post(
        "/callbacks/smspilot?ref=order-42",
        data={"server_id": server_id, "status": "2", "error": "0"},
    )
    assert (200, "OK") == (response.status_code, response.text)
    [item] = status_events(service, nats_server, server_id)
    assert "delivered" == item.event["data"]["status"]
    assert {"ref": "order-42"} == item.event["data"]["callback_params"]


def test_post_multipart_form_is_accepted(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    server_id = new_id()
    response = client.post(
        "/callbacks/smspilot",
        files={"server_id": (None, server_id), "status": (None, "1")},
    )
    assert (200, "OK") == (response.status_code, response.text)
    [item] = status_events(service, nats_server, server_id)
    assert "sent" == item.event["data"]["status"]


def test_extra_query_parameters_are_kept_as_callback_params(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    server_id = new_id()
    response = client.get(
        "/callbacks/smspilot",
        params={"ref": "order-42", "tenant": "шоп", "server_id": server_id, "status": "2"},
    )
    assert 200 == response.status_code
    [item] = status_events(service, nats_server, server_id)
    assert {"ref": "order-42", "tenant": "шоп"} == item.event["data"]["callback_params"]


def test_repeated_callback_is_stored_once(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    server_id = new_id()
    for _ in range(3):
        response = client.get("/callbacks/smspilot", params={"server_id": server_id, "status": 2})
        assert "OK" == response.text
    assert 1 == len(status_events(service, nats_server, server_id))


def test_concurrent_duplicate_callbacks_are_stored_once(
    service: Smsbus, nats_server: NatsServer
) -> None:
    server_id = new_id()

    def call(_: int) -> str:
        params = {"server_id": server_id, "status": "1"}
        return httpx.get(f"{service.base}/callbacks/smspilot", params=params, timeout=10).text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(32)))
    assert ["OK"] * 32 == answers
    assert 1 == len(status_events(service, nats_server, server_id))


def test_a_new_status_for_the_same_message_is_a_new_event(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    server_id = new_id()
    for raw in ("0", "1", "2"):
        client.get("/callbacks/smspilot", params={"server_id": server_id, "status": raw})
    events = status_events(service, nats_server, server_id)
    assert ["queued", "sent", "delivered"] == [e.event["data"]["status"] for e in events]
    assert 3 == len(events_by_id(events))


BAD_ID = "server_id must be a whole number of at most 20 digits"
MALFORMED = [
    ({"status": "2"}, "server_id is missing"),
    ({"server_id": "12a", "status": "2"}, BAD_ID),
    ({"server_id": "1" * 21, "status": "2"}, BAD_ID),
    ({"server_id": "5"}, "status is missing"),
    ({"server_id": "5", "status": "delivered"}, "status must be a whole number"),
    ({"server_id": "5", "status": "2", "error": "x"}, "error must be a whole number"),
]


@pytest.mark.parametrize(("params", "reason"), MALFORMED)
def test_malformed_callback_is_400_with_reason_and_dead_lettered(
    service: Smsbus,
    nats_server: NatsServer,
    client: httpx.Client,
    params: dict[str, str],
    reason: str,
) -> None:
    marker = new_id()
    response = client.get("/callbacks/smspilot", params={**params, "marker": marker})

    assert (400, reason) == (response.status_code, response.text)
    assert "\n" not in response.text
    letters = [
        s
        for s in stored(service, nats_server, "deadletter")
        if s.event["data"]["raw"]["query"].get("marker") == marker
    ]
    [letter] = letters
    assert f"{service.prefix}.deadletter.smspilot" == letter.subject
    assert "sms.deadletter" == letter.event["type"]
    data = letter.event["data"]
    assert ("smspilot", reason) == (data["provider"], data["reason"])
    assert {
        "method": "GET",
        "path": "/callbacks/smspilot",
        "query": {**params, "marker": marker},
        "body": "",
        "peer": "127.0.0.1",
    } == data["raw"]


def test_conflicting_duplicate_parameter_is_400(client: httpx.Client) -> None:
    response = client.get("/callbacks/smspilot?server_id=1&server_id=2&status=2")
    assert (400, "server_id is given twice with different values") == (
        response.status_code,
        response.text,
    )


def test_body_that_is_not_a_form_is_400(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    marker = new_id()
    response = client.post(
        f"/callbacks/smspilot?marker={marker}",
        content=b'{"server_id": 1}',
        headers={"content-type": "application/json"},
    )
    assert 400 == response.status_code
    assert "unsupported Content-Type 'application/json'" == response.text
    [letter] = [
        s
        for s in stored(service, nats_server, "deadletter")
        if s.event["data"]["raw"]["query"].get("marker") == marker
    ]
    assert '{"server_id": 1}' == letter.event["data"]["raw"]["body"]


def test_a_windows_1251_parameter_is_kept_escaped_and_the_status_accepted(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    """Older Russian systems build callback URLs in windows-1251: `?ref=Заказ` arrives as
    %C7%E0%EA%E0%E7. Refusing it would lose every status of that sender."""
    for method in ("GET", "POST"):
        server_id = new_id()
        query = f"server_id={server_id}&status=2&ref=%C7%E0%EA%E0%E7&raw=%ff%fe&ok=%D1%88"
        if method == "GET":
            response = client.get(f"/callbacks/smspilot?{query}")
        else:
            response = client.post(
                "/callbacks/smspilot", content=query.encode(),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )  # fmt: skip
        assert (200, "OK") == (response.status_code, response.text)
        [item] = status_events(service, nats_server, server_id)
        assert {"ref": "%C7%E0%EA%E0%E7", "raw": "%FF%FE", "ok": "ш"} == item.event["data"][
            "callback_params"
        ]


def test_smspilots_own_fields_must_be_plain(client: httpx.Client) -> None:
    response = client.get("/callbacks/smspilot?server_id=1%ff&status=2")
    assert (400, "server_id must be a whole number of at most 20 digits") == (
        response.status_code,
        response.text,
    )


def test_oversized_body_is_413_and_dead_lettered_cut_at_16k(
    service: Smsbus, nats_server: NatsServer, client: httpx.Client
) -> None:
    marker = new_id()
    body = b"server_id=1&status=2&pad=" + b"x" * (70 * 1024)
    response = client.post(f"/callbacks/smspilot?marker={marker}", content=body)
    assert (413, "request body exceeds 65536 bytes") == (response.status_code, response.text)
    [letter] = [
        s
        for s in stored(service, nats_server, "deadletter")
        if s.event["data"]["raw"]["query"].get("marker") == marker
    ]
    assert 16 * 1024 >= len(letter.event["data"]["raw"]["body"])


def test_chunked_oversized_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"server_id=1&status=2&pad="
        for _ in range(80):
            yield b"y" * 1024

    response = client.post("/callbacks/smspilot", content=chunks())
    assert 413 == response.status_code


def test_other_methods_are_405(client: httpx.Client) -> None:
    response = client.put("/callbacks/smspilot?server_id=1&status=2")
    assert 405 == response.status_code
    assert "GET, POST" == response.headers["allow"]


def test_a_token_path_without_configured_token_is_404(client: httpx.Client) -> None:
    assert 404 == client.get("/callbacks/smspilot/anything?server_id=1&status=2").status_code


def test_healthz_readyz_and_metrics(service: Smsbus, client: httpx.Client) -> None:
    assert {"alive": True} == client.get("/healthz").json()
    ready = client.get("/readyz")
    assert 200 == ready.status_code
    body = ready.json()
    assert (True, "ok", 0) == (body["ready"], body["reason"], body["spool_depth"])
    assert {"enabled", "leader", "last_success", "last_error"} == set(body["providers"]["smspilot"])

    client.get("/callbacks/smspilot", params={"server_id": new_id(), "status": "2"})
    text = client.get("/metrics").text
    for name in (
        'smsbus_callbacks_total{outcome="published"}',
        'smsbus_events_published_total{provider="smspilot",type="status"}',
        "smsbus_publish_duration_seconds_bucket",
        "smsbus_publish_failures_total",
        "smsbus_spool_depth 0.0",
        'smsbus_deadletters_total{provider="smspilot"}',
    ):
        assert name in text
    published = next(
        line
        for line in text.splitlines()
        if line.startswith('smsbus_callbacks_total{outcome="published"}')
    )
    assert float(published.split()[-1]) >= 1
    [free] = [line for line in text.splitlines() if line.startswith("smsbus_data_dir_free_bytes ")]
    assert shutil.disk_usage(service.data_dir).free == pytest.approx(
        float(free.split()[-1]), rel=0.05
    )


def summary_lines(service: Smsbus, server_ids: set[str]) -> list[dict[str, Any]]:
    return [
        entry
        for entry in service.log_lines()
        if entry.get("event") == "callback" and entry.get("server_id") in server_ids
    ]


def test_one_summary_log_line_per_callback(service: Smsbus, client: httpx.Client) -> None:
    server_id = new_id()
    client.get("/callbacks/smspilot", params={"server_id": server_id, "status": "2"})
    # Written once the answer is out (receiver/smspilot.py): wait for it, then for nothing more.
    wait_for(lambda: summary_lines(service, {server_id}), what="the summary line")
    [line] = summary_lines(service, {server_id})
    assert ("smspilot", "delivered", "published", 200) == (
        line["provider"],
        line["status"],
        line["outcome"],
        line["http_status"],
    )
    assert isinstance(line["latency_ms"], float)


def test_callbacks_answered_together_are_each_counted_and_logged_once(
    service: Smsbus,
) -> None:
    """Under load a batch's acknowledgement wakes many callbacks in one turn of the event loop;
    their counts and lines follow their answers, one each."""
    server_ids = [new_id() for _ in range(64)]
    before = service.metric("smsbus_callbacks_total", outcome="published")

    def call(server_id: str) -> str:
        params = {"server_id": server_id, "status": "2"}
        return httpx.get(f"{service.base}/callbacks/smspilot", params=params, timeout=10).text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, server_ids))
    assert ["OK"] * 64 == answers
    wait_for(lambda: len(summary_lines(service, set(server_ids))) >= 64, what="64 summary lines")
    lines = summary_lines(service, set(server_ids))
    assert sorted(server_ids) == sorted(line["server_id"] for line in lines)
    assert {"published"} == {line["outcome"] for line in lines}
    published = service.metric("smsbus_callbacks_total", outcome="published") - before
    assert 64 == published


def test_unknown_route_is_plain_404(client: httpx.Client) -> None:
    response = client.get("/nope")
    assert 404 == response.status_code
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    "headers",
    [{"X-Big": "a" * 100_000}, {f"X-H{i}": "v" for i in range(150)}],
    ids=["one-huge-header", "too-many-headers"],
)
def test_oversized_headers_are_431(client: httpx.Client, headers: dict[str, str]) -> None:
    response = client.get("/callbacks/smspilot?server_id=1&status=2", headers=headers)
    assert (431, "request headers exceed 16384 bytes or 100 fields") == (
        response.status_code,
        response.text,
    )
    assert 200 == client.get("/healthz").status_code
