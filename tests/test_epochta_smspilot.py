"""ePochta and SMSPilot: parsers on their documents' examples and codes; pollers end to end."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from lxml import etree

from bus.config import load_settings
from bus.errors import ProviderAuthError, ProviderPayloadError
from pollers import epochta, smspilot
from pollers.types import InboundSms, StatusReport
from tests.fakes import hostile
from tests.fakes.epochta import FakeEpochta
from tests.fakes.server import Served
from tests.fakes.smspilot import FakeSmspilot
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

MSK = ZoneInfo("Europe/Moscow")
_ids = itertools.count(random.randrange(10**8, 10**9))


# ePochta, epochta.txt


def test_epochta_getstatus_request_is_the_documented_document() -> None:
    root = etree.fromstring(epochta.request("GETSTATUS", "u<&>", "p", ["msg11", "msg12"]))
    assert "GETSTATUS" == root.findtext("operations/operation")
    assert ("u<&>", "p") == (
        root.findtext("authentication/username"),
        root.findtext("authentication/password"),
    )
    assert ["msg11", "msg12"] == [m.text for m in root.findall("statistics/messageid")]


def test_epochta_deliveryreport() -> None:
    body = (
        b'<deliveryreport><message id="msg11" sentdate="2026-11-22 10:00:00" '
        b'donedate="2026-11-22 10:00:07" status="DELIVERED"/>'
        b'<message id="msg12" sentdate="2026-11-22 10:00:00" donedate="" status="SENT"/>'
        b"</deliveryreport>"
    )
    assert [
        StatusReport("msg11", "DELIVERED", datetime(2026, 11, 22, 7, 0, 7, tzinfo=UTC)),
        StatusReport("msg12", "SENT", datetime(2026, 11, 22, 7, 0, 0, tzinfo=UTC)),
    ] == epochta.parse_status(body, MSK)


@pytest.mark.parametrize(
    "declaration",
    ["", '<?xml version="1.0"?>\n', '<?xml version="1.0" encoding="UTF-8"?>\n'],
)
def test_an_epochta_answer_in_windows_1251_is_read_as_such(declaration: str) -> None:
    """The document gives its answers no declaration nor a charset, and ids are the sender's
    own: a server on windows-1251 answers a Cyrillic id in it, with no declaration, or one that
    names no encoding or (wrongly) UTF-8. Refused, its status would never be read."""
    body = (
        f'{declaration}<deliveryreport><message id="заказ-42" sentdate="2026-11-22 10:00:00" '
        'donedate="2026-11-22 10:00:07" status="DELIVERED"/></deliveryreport>'
    ).encode("cp1251")
    assert [
        StatusReport("заказ-42", "DELIVERED", datetime(2026, 11, 22, 7, 0, 7, tzinfo=UTC))
    ] == epochta.parse_status(body, MSK)


def test_an_answer_declared_in_another_encoding_is_read_in_it() -> None:
    body = (
        '<?xml version="1.0" encoding="koi8-r"?><deliveryreport><message id="заказ-42" '
        'sentdate="2026-11-22 10:00:00" donedate="" status="SENT"/></deliveryreport>'
    ).encode("koi8-r")
    assert ["заказ-42"] == [r.message_id for r in epochta.parse_status(body, MSK)]


def test_epochta_balance() -> None:
    body = b"<RESPONSE><status>0</status><credits>123.45</credits></RESPONSE>"
    assert Decimal("123.45") == epochta.parse_balance(body)


@pytest.mark.parametrize(
    ("status", "error"),
    [("-1", ProviderAuthError), ("-2", ProviderPayloadError), ("-3", ProviderPayloadError),
     ("-4", ProviderPayloadError)],
)  # fmt: skip
def test_epochta_documented_failures(status: str, error: type[Exception]) -> None:
    body = f"<RESPONSE><status>{status}</status><credits></credits></RESPONSE>".encode()
    with pytest.raises(error, match=f"status {status}"):
        epochta.parse_status(body, MSK)
    with pytest.raises(error):
        epochta.parse_balance(body)


# SMSPilot, smspilot.txt


def test_smspilot_check_example() -> None:
    # 2.3 "Ответ сервера", JSON.
    body = (
        b'{"check": [{ "id": "12345", "server_id" : "10005", "status": "1", "modified": '
        b'"2011-08-11 14:35:00" }, { "id": "12346", "server_id" : "10006", "status": "2", '
        b'"modified": "2011-08-11 15:12:22" }]}'
    )
    assert [
        StatusReport("10005", "1", datetime(2011, 8, 11, 10, 35, tzinfo=UTC)),
        StatusReport("10006", "2", datetime(2011, 8, 11, 11, 12, 22, tzinfo=UTC)),
    ] == smspilot.parse_check(body, MSK)


def test_smspilot_inbound_example() -> None:
    # 5 "Входящие", JSON (the document's line break inside a string made valid).
    body = (
        '{"apikey": "XYZ", "inbound": [{ "id": "12345", "phone": "79087964781", "num": '
        '"79021121075", "text": "1234 Ура работает!", "created": "2011-09-20 20:15", '
        '"r_message": "", "r_status": "0"}]}'
    ).encode()
    assert (
        [
            InboundSms(
                "12345",
                "79087964781",
                "79021121075",
                "1234 Ура работает!",
                datetime(2011, 9, 20, 16, 15, tzinfo=UTC),
            )
        ],
        [],
    ) == smspilot.parse_inbound(body, MSK)


def test_smspilot_balance_example() -> None:
    assert Decimal("405.60") == smspilot.parse_balance(b'{"balance": 405.60}')


@pytest.mark.parametrize(
    ("code", "error"),
    [("400", ProviderAuthError), ("401", ProviderAuthError), ("303", ProviderPayloadError),
     ("304", ProviderPayloadError), ("500", ProviderPayloadError)],
)  # fmt: skip
def test_smspilot_documented_errors(code: str, error: type[Exception]) -> None:
    body = f'{{"error": {{"code": "{code}", "description": "x"}}}}'.encode()
    with pytest.raises(error, match=f"error {code}"):
        smspilot.parse_check(body, MSK)


def test_smspilot_302_means_an_id_is_not_known_yet() -> None:
    with pytest.raises(smspilot.NotFound):
        smspilot.parse_check(b'{"error": {"code": "302"}}', MSK)


def test_a_check_row_with_an_error_code_carries_its_text() -> None:
    body = b'{"check": [{"server_id": "5", "status": "-1", "error": "603", "modified": ""}]}'
    [report] = smspilot.parse_check(body, MSK)
    assert ("-1", "603", "Rejected") == (report.raw_status, report.error_code, report.error)


def test_inbound_created_is_moscow_time_whatever_the_zone_setting() -> None:
    """The client reads it without SMSBUS_SMSPILOT_TZ (which is for `modified`)."""
    row = {"id": "1", "phone": "7", "num": "8", "text": "t", "created": "2026-09-20 20:15"}
    [sms], _ = smspilot.parse_inbound(orjson.dumps({"inbound": [row]}))
    assert datetime(2026, 9, 20, 17, 15, tzinfo=UTC) == sms.sent_at


def test_one_unknown_id_does_not_hold_back_the_known_ones() -> None:
    fake = FakeSmspilot()
    known = [str(10_000 + n) for n in range(99)]
    fake.statuses = {i: ("2", "2026-11-22 10:00:00") for i in known}
    unknown = "99999"
    with Served(fake.app) as served:
        env = {"SMSBUS_SMSPILOT_URL": served.url, "SMSBUS_SMSPILOT_APIKEY": fake.apikey,
               "SMSBUS_SMSPILOT_TZ": "UTC"}  # fmt: skip
        settings = load_settings(env).providers["smspilot"]

        async def check() -> list[StatusReport]:
            async with httpx.AsyncClient() as http:
                return await smspilot.Client(settings, http).statuses(
                    [*known[:50], unknown, *known[50:]]
                )

        reports = asyncio.run(check())
    assert sorted(known) == sorted(r.message_id for r in reports)
    assert len(fake.requests) <= 2 * 8  # a bisection, not an id at a time


@pytest.mark.parametrize("body", [hostile.GARBAGE, b"[]", b'{"check": 5}', b""])
def test_smspilot_hostile_answers(body: bytes) -> None:
    with pytest.raises(ProviderPayloadError):
        smspilot.parse_check(body, MSK)


@pytest.mark.parametrize("body", [hostile.GARBAGE, hostile.XXE, hostile.BILLION_LAUGHS])
def test_epochta_hostile_answers(body: bytes) -> None:
    with pytest.raises(ProviderPayloadError):
        epochta.parse_status(body, MSK)


# End to end


@pytest.fixture
def fakes() -> Iterator[tuple[FakeEpochta, str, FakeSmspilot, str]]:
    pochta, pilot = FakeEpochta(), FakeSmspilot()
    with Served(pochta.app) as served_pochta, Served(pilot.app) as served_pilot:
        yield pochta, served_pochta.url, pilot, served_pilot.url


def status_events(nats: NatsServer, bus: Smsbus, provider: str, message_id: str) -> list[dict]:
    return [
        s.event["data"]
        for s in read_stream(nats.url, bus.stream, f"{bus.prefix}.status.{provider}.>")
        if s.event["subject"] == message_id
    ]


def test_epochta_statuses_of_ids_of_any_script_from_a_server_on_windows_1251(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """ePochta's ids are the sender's own: Cyrillic ones, and ones with XML's special
    characters, answered by a server on windows-1251 as its document allows; each status is
    stored once, under the id as registered, and nothing is a dead letter."""
    pochta = FakeEpochta(charset="cp1251")
    ids = [f"заказ-{next(_ids)}", f"R&D <{next(_ids)}>", f"msg{next(_ids)}"]
    for message_id in ids:
        pochta.statuses[message_id] = ("DELIVERED", "2026-11-22 10:00:00", "2026-11-22 10:01:00")
    with Served(pochta.app) as served:
        env = isolated_env(
            nats_server.url,
            SMSBUS_EPOCHTA_URL=served.url,
            SMSBUS_EPOCHTA_USERNAME=pochta.username,
            SMSBUS_EPOCHTA_PASSWORD=pochta.password,
            SMSBUS_EPOCHTA_INTERVAL="0.3",
        )
        bus = Smsbus(env, tmp_path).start()
        try:
            bus.register(*({"provider": "epochta", "message_id": i} for i in ids))
            wait_for(lambda: bus.metric("smsbus_events_published_total", provider="epochta",
                                        type="status") >= len(ids),
                     what="every status")  # fmt: skip
            stored = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.epochta.>")
            assert sorted(ids) == sorted(s.event["data"]["message_id"] for s in stored)
            assert {"delivered"} == {s.event["data"]["status"] for s in stored}
            assert 0 == bus.metric("smsbus_deadletters_total", provider="epochta")
        finally:
            assert 0 == bus.stop()


@pytest.mark.slow
def test_epochta_and_smspilot_pollers(
    nats_server: NatsServer,
    tmp_path: Path,
    fakes: tuple[FakeEpochta, str, FakeSmspilot, str],
) -> None:
    pochta, pochta_url, pilot, pilot_url = fakes
    env = isolated_env(
        nats_server.url,
        SMSBUS_EPOCHTA_URL=pochta_url,
        SMSBUS_EPOCHTA_USERNAME=pochta.username,
        SMSBUS_EPOCHTA_PASSWORD=pochta.password,
        SMSBUS_EPOCHTA_INTERVAL="0.3",
        SMSBUS_SMSPILOT_URL=pilot_url,
        SMSBUS_SMSPILOT_APIKEY=pilot.apikey,
        SMSBUS_SMSPILOT_INTERVAL="0.3",
        SMSBUS_SMSPILOT_RECONCILE_AFTER="1",
    )
    bus = Smsbus(env, tmp_path).start()
    try:
        letter, server_id = f"msg{next(_ids)}", str(next(_ids))
        pochta.statuses[letter] = ("NOT_DELIVERED", "2026-11-22 10:00:00", "2026-11-22 10:01:00")
        pilot.statuses[server_id] = ("1", "2026-11-22 10:00:05")
        response = httpx.post(
            f"{bus.api}/v1/messages",
            json=[
                {"provider": "epochta", "message_id": letter},
                {"provider": "smspilot", "message_id": server_id, "client_ref": "p-1"},
            ],
        )
        assert 202 == response.status_code
        # The callback and the reconcile poll report the same fact: one stored event.
        httpx.get(f"{bus.base}/callbacks/smspilot", params={"server_id": server_id, "status": 1})
        wait_for(lambda: pilot.requests and any("check" in r for r in pilot.requests), what="check")
        pilot.statuses[server_id] = ("2", "2026-11-22 10:00:09")
        wait_for(
            lambda: (
                [e["status"] for e in status_events(nats_server, bus, "smspilot", server_id)]
                == ["sent", "delivered"]
            ),
            what="the reconciled delivered",
        )
        delivered = status_events(nats_server, bus, "smspilot", server_id)[-1]
        assert ("poll", "p-1", "2026-11-22T07:00:09.000Z") == (
            delivered["via"],
            delivered["client_ref"],
            delivered["occurred_at"],
        )
        [undelivered] = wait_for(
            lambda: status_events(nats_server, bus, "epochta", letter), what="ePochta's report"
        )
        assert ("undelivered", True, "NOT_DELIVERED") == (
            undelivered["status"],
            undelivered["final"],
            undelivered["provider_status"],
        )

        def balances() -> dict[str, str]:
            found = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.balance.>")
            return {s.event["data"]["provider"]: s.event["data"]["unit"] for s in found}

        wait_for(lambda: len(balances()) == 2, what="both balances")
        assert {"epochta": "credits", "smspilot": "RUB"} == balances()
        assert all(r["apikey"] == pilot.apikey for r in pilot.requests)
        assert pilot.apikey not in bus.logs() and pochta.password not in bus.logs()
    finally:
        assert 0 == bus.stop()
