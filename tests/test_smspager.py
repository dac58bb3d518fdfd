"""SMS-Pager: the parsers on the document's shapes and codes; the mailing poller end to end."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import structlog
from lxml import etree

from bus.config import load_settings
from bus.errors import ProviderAuthError, ProviderPayloadError
from pollers import smspager
from pollers.types import StatusReport
from tests.fakes import hostile
from tests.fakes.server import Served
from tests.fakes.smspager import FakeSmspager
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

_ids = itertools.count(random.randrange(10**6, 10**7))

# smspager.txt, "Детальный способ", "Ответ сервера" (with real values for the placeholders).
DETAIL = b"""<?xml version='1.0' encoding='UTF-8'?>
<data>
<code>1</code>
<descr>OK</descr>
<sms><smsid>abcde123</smsid><datetime>2010-02-01 12:00:00</datetime><text>T</text>
<source>Magazin</source><allCol>6</allCol><deliveredCol>2</deliveredCol>
<notDeliveredCol>2</notDeliveredCol><waitingCol>1</waitingCol><enqueuedCol>1</enqueuedCol>
<payment>3</payment></sms>
<detail>
<delivered>
<number>+79019011234</number>
<number>7-902-902-12 34</number>
</delivered>
<notDelivered>
<number>79039031234</number>
<number>79049041234</number>
</notDelivered>
<waiting>
<number>79059051234</number>
</waiting>
<enqueued>
<number>79069061234</number>
</enqueued>
</detail>
</data>"""


def test_request_carries_escaped_credentials_in_the_body() -> None:
    root = etree.fromstring(smspager.request("test", "12<3456", smsid="abcde123"))
    assert ("test", "12<3456", "abcde123") == (
        root.findtext("login"),
        root.findtext("password"),
        root.findtext("smsid"),
    )


def test_detail_gives_one_report_per_number_and_group() -> None:
    assert [
        StatusReport("abcde123", "delivered", None, phone="79019011234"),
        StatusReport("abcde123", "delivered", None, phone="79029021234"),
        StatusReport("abcde123", "notDelivered", None, phone="79039031234"),
        StatusReport("abcde123", "notDelivered", None, phone="79049041234"),
        StatusReport("abcde123", "waiting", None, phone="79059051234"),
        StatusReport("abcde123", "enqueued", None, phone="79069061234"),
    ] == smspager.parse_detail(DETAIL, "abcde123")


def test_general_report_counters() -> None:
    assert {"abcde123": ("6", "2", "2", "1", "1")} == smspager.parse_general(DETAIL)


def test_balance() -> None:
    body = (
        b"<?xml version='1.0'?><data><code>1</code><descr>OK</descr><account>12.5</account></data>"
    )
    assert Decimal("12.5") == smspager.parse_balance(body)


@pytest.mark.parametrize(
    ("code", "error"),
    [("501", ProviderAuthError), ("500", ProviderPayloadError), ("502", ProviderPayloadError),
     ("503", ProviderPayloadError), ("504", ProviderPayloadError), ("701", ProviderPayloadError),
     ("7042", ProviderPayloadError)],
)  # fmt: skip
def test_every_documented_code(code: str, error: type[Exception]) -> None:
    body = f"<data><code>{code}</code><descr>x</descr></data>".encode()
    with pytest.raises(error, match=f"code {code}"):
        smspager.parse_detail(body, "x")


@pytest.mark.parametrize(
    "body", [hostile.GARBAGE, hostile.TRUNCATED, hostile.XXE, hostile.BILLION_LAUGHS]
)
def test_hostile_answers(body: bytes) -> None:
    with pytest.raises(ProviderPayloadError):
        smspager.parse_general(body)


@pytest.fixture
def pager() -> Iterator[tuple[FakeSmspager, str]]:
    fake = FakeSmspager()
    with Served(fake.app) as served:
        yield fake, served.url


def test_mailing_numbers_become_events_and_the_mailing_finishes(
    nats_server: NatsServer, tmp_path: Path, pager: tuple[FakeSmspager, str]
) -> None:
    fake, url = pager
    smsid = f"m{next(_ids)}"
    fake.mailings[smsid] = {"delivered": ["+79019011234"], "waiting": ["79029021234"]}
    env = isolated_env(
        nats_server.url,
        SMSBUS_SMSPAGER_URL=url,
        SMSBUS_SMSPAGER_LOGIN=fake.login,
        SMSBUS_SMSPAGER_PASSWORD=fake.password,
        SMSBUS_SMSPAGER_INTERVAL="0.3",
        SMSBUS_SMSPAGER_MAX_INTERVAL="0.6",
        SMSBUS_BALANCE_INTERVAL="1",
    )
    bus = Smsbus(env, tmp_path).start()
    try:
        response = httpx.post(
            f"{bus.api}/v1/messages",
            json={"provider": "smspager", "message_id": smsid, "client_ref": "mail-1"},
        )
        assert 202 == response.status_code

        def events() -> list[tuple[str, str, str]]:
            found = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.smspager.>")
            return [
                (e.event["data"]["phone"], e.event["data"]["status"], e.event["data"]["client_ref"])
                for e in found
                if e.event["subject"] == smsid
            ]

        wait_for(lambda: len(events()) == 2, what="one event per number")
        assert {("79019011234", "delivered", "mail-1"), ("79029021234", "queued", "mail-1")} == set(
            events()
        )
        fake.mailings[smsid] = {"delivered": ["+79019011234"], "notDelivered": ["79029021234"]}
        wait_for(lambda: len(events()) == 3, what="the change")
        assert ("79029021234", "undelivered", "mail-1") == events()[-1]

        def mailing() -> dict[str, Any]:
            return httpx.get(f"{bus.api}/v1/messages/smspager/{smsid}", timeout=5).json()

        shown = wait_for(lambda: mailing()["final"] and mailing(), what="the mailing to finish")
        assert ("undelivered", "notDelivered", "mail-1") == (
            shown["status"],
            shown["provider_status"],
            shown["client_ref"],
        )
        number = httpx.get(f"{bus.api}/v1/messages/smspager/{smsid}/79019011234", timeout=5)
        assert ("delivered", True) == (number.json()["status"], number.json()["final"])
        # Final: its detailed report is no longer asked for, while time (balances) goes by.
        polled = fake.detail_requests().count(smsid)
        balances = fake.balance_requests()
        wait_for(lambda: fake.balance_requests() >= balances + 2, what="two more balance reads")
        assert polled == fake.detail_requests().count(smsid)
        assert fake.password not in bus.logs()
    finally:
        assert 0 == bus.stop()


class Clock:
    """The SMS-Pager client's clock, moved by the test (the process's own clock is left alone:
    the event loops of the test and of the fake provider run on it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pager_client(
    url: str, fake: FakeSmspager, clock: Clock | None = None, **extra: str
) -> smspager.Client:
    env = {"SMSBUS_SMSPAGER_URL": url, "SMSBUS_SMSPAGER_LOGIN": fake.login,
           "SMSBUS_SMSPAGER_PASSWORD": fake.password, **extra}  # fmt: skip
    settings = load_settings(env).providers["smspager"]
    return smspager.Client(settings, None, clock or time.monotonic)  # type: ignore[arg-type]


def polled(url: str, fake: FakeSmspager, client: smspager.Client, *ids: str) -> list[StatusReport]:
    async def run() -> list[StatusReport]:
        async with httpx.AsyncClient() as http:
            client._http = http
            return await client.statuses(list(ids))

    return asyncio.run(run())


def test_a_change_seen_while_polling_one_mailing_is_not_used_up_for_another(
    pager: tuple[FakeSmspager, str],
) -> None:
    fake, url = pager
    clock = Clock()
    client = pager_client(url, fake, clock, SMSBUS_SMSPAGER_INTERVAL="30")
    fake.mailings["A"] = {"waiting": ["79010000001"]}
    fake.mailings["B"] = {"waiting": ["79010000002"]}
    assert 2 == len(polled(url, fake, client, "A", "B"))  # both detailed once
    fake.mailings["B"] = {"delivered": ["79010000002"]}  # B changes...
    clock.now += 31
    polled(url, fake, client, "A")  # ...and A's poll is the one to read the report
    clock.now += 31  # the report is read again, and shows no change since A's poll
    [report] = polled(url, fake, client, "B")
    assert ("B", "delivered") == (report.message_id, report.raw_status)


def test_a_mailing_cancelled_by_moderation_is_seen_though_no_counter_moves(
    pager: tuple[FakeSmspager, str],
) -> None:
    fake, url = pager
    clock = Clock()
    client = pager_client(
        url, fake, clock, SMSBUS_SMSPAGER_INTERVAL="30", SMSBUS_SMSPAGER_MAX_INTERVAL="600"
    )
    fake.mailings["M"] = {"onModer": ["79010000003"]}
    assert ["onModer"] == [r.raw_status for r in polled(url, fake, client, "M")]
    fake.mailings["M"] = {"cancel": ["79010000003"]}  # the counters are all the same
    clock.now += 31
    assert [] == polled(url, fake, client, "M")  # nothing moved, nothing asked
    clock.now += 600
    assert ["cancel"] == [r.raw_status for r in polled(url, fake, client, "M")]


def test_a_mailing_sent_again_to_the_same_numbers_is_named_in_one_warning(
    pager: tuple[FakeSmspager, str],
) -> None:
    """The document's third example: one smsid, the same numbers at 12:00 and again at 18:00.
    Its detailed report lists each number twice; a status is known by smsid and number, so one
    report per number and group, and the mailing is named in a warning, once."""
    fake, url = pager
    clock = Clock()
    client = pager_client(url, fake, clock, SMSBUS_SMSPAGER_INTERVAL="30")
    numbers = ["+79019011234", "7-902-902-12 34", "89039031234"]
    fake.mailings["abcde123"] = {"delivered": numbers, "waiting": numbers}
    fake.mailings["other"] = {"delivered": ["79010000009", "79010000009"], "waiting": []}
    with structlog.testing.capture_logs() as logs:
        reports = polled(url, fake, client, "abcde123", "other")
        fake.mailings["abcde123"] = {
            "delivered": numbers + numbers[:1],
            "notDelivered": numbers[1:],
        }
        clock.now += 31
        again = polled(url, fake, client, "abcde123")
    assert [
        ("79019011234", "delivered"), ("79029021234", "delivered"), ("89039031234", "delivered"),
        ("79019011234", "waiting"), ("79029021234", "waiting"), ("89039031234", "waiting"),
        ("79010000009", "delivered"),
    ] == [(r.phone, r.raw_status) for r in reports]  # fmt: skip
    assert 5 == len(again)
    warned = [line for line in logs if line["log_level"] == "warning"]
    assert [("abcde123", 3), ("other", 1)] == [(w["smsid"], w["numbers"]) for w in warned]
    assert all("use an smsid per send" in w["event"] for w in warned)


def test_the_general_report_covers_the_ttl_and_cannot_cut_today_off(
    pager: tuple[FakeSmspager, str],
) -> None:
    fake, url = pager
    fake.mailings["M"] = {"waiting": ["79010000004"]}
    polled(url, fake, pager_client(url, fake), "M")
    [general] = [etree.fromstring(b) for p, b in fake.bodies if b"<start>" in b]
    today = datetime.now(ZoneInfo("Europe/Moscow")).date()
    assert str(today - timedelta(days=3)) == general.findtext("start")
    assert str(today + timedelta(days=1)) == general.findtext("stop")
