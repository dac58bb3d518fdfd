"""SMSC: the fmt=3 parsers and error shapes; the history poller, inbound and the rate rule."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest

from bus.config import ProviderSettings, load_settings
from bus.errors import (
    ProviderAuthError,
    ProviderPayloadError,
    ProviderRowError,
    ProviderUnavailable,
)
from pollers.smsc import Client, RateGuard, parse_answers, parse_history
from pollers.types import InboundRead, InboundSms, StatusReport
from tests.fakes.server import Served
from tests.fakes.smsc import FakeSmsc
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

KYIV = ZoneInfo("Europe/Kyiv")


def row(message_id: int, status: int, err: int = 0, **extra: object) -> dict[str, object]:
    # The fmt=3 row of smsc.txt "Получение истории отправленных сообщений".
    return {
        "status": status, "last_date": "22.11.2026 12:00:05", "last_timestamp": 1795341605,
        "err": err, "send_date": "22.11.2026 12:00:00", "send_timestamp": 1795341600,
        "phone": "380501234567", "cost": "0.5", "sender_id": "SMSC", "status_name": "Доставлено",
        "message": "hi", "country": "Украина", "operator": "Kyivstar", "region": "",
        "id": message_id, **extra,
    }  # fmt: skip


def test_history_row() -> None:
    body = httpx.Response(200, json=[row(7, 1)]).content
    assert [
        StatusReport("7", "1", datetime.fromtimestamp(1795341605, UTC), None, None, "380501234567")
    ] == parse_history(body, KYIV)


def test_history_row_without_timestamp_reads_the_date_in_kyiv() -> None:
    body = httpx.Response(200, json=[row(7, 20, err=1, last_timestamp=None)]).content
    [report] = parse_history(body, KYIV)
    assert datetime(2026, 11, 22, 10, 0, 5, tzinfo=UTC) == report.occurred_at
    assert ("20", "1") == (report.raw_status, report.error_code)


def test_a_history_row_whose_dates_are_all_zeros_has_no_time() -> None:
    body = httpx.Response(
        200, json=[row(7, -1, last_timestamp=0, last_date="00.00.0000 00:00:00")]
    ).content
    [report] = parse_history(body, KYIV)
    assert ("-1", None) == (report.raw_status, report.occurred_at)


def test_inbound_row() -> None:
    # smsc.txt "Получение входящих сообщений", fmt=3.
    body = httpx.Response(
        200,
        json=[{"id": 1234568, "received": "22.11.2026 12:00:09", "phone": "380501234567",
               "message": "СТОП", "to_phone": "380441234567", "sent": "22.11.2026 12:00:07"}],
    ).content  # fmt: skip
    assert (
        [
            InboundSms(
                "1234568", "380501234567", "380441234567", "СТОП",
                datetime(2026, 11, 22, 10, 0, 7, tzinfo=UTC),
            )
        ],
        [],
    ) == parse_answers(body, KYIV)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"error": "x", "error_code": 1}', ProviderPayloadError),
        (b'{"error": "x", "error_code": 2}', ProviderAuthError),
        (b'{"error": "x", "error_code": 4}', ProviderUnavailable),
        (b'{"error": "x", "error_code": 9}', ProviderUnavailable),
        (b'[{"error": "x", "error_code": 2}]', ProviderAuthError),
        (b"ERROR = 2 (authorise error)", ProviderAuthError),
        (b"ERROR = 9 (duplicate request)", ProviderUnavailable),
        (b'{"error": "x"}', ProviderPayloadError),
        (b"<xml/>", ProviderPayloadError),
        (b'[{"status": 1}]', ProviderPayloadError),
    ],
)
def test_every_error_shape(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_history(body, KYIV)


def test_error_9_demands_a_minute() -> None:
    with pytest.raises(ProviderUnavailable) as info:
        parse_answers(b'{"error": "x", "error_code": 9}', KYIV)
    assert info.value.retry_after >= 60


def test_error_3_is_an_empty_history() -> None:
    assert [] == parse_history(b'{"error": "not found", "error_code": 3}', KYIV)


@pytest.fixture
def smsc() -> Iterator[tuple[FakeSmsc, str]]:
    fake = FakeSmsc()
    with Served(fake.app) as served:
        yield fake, served.url


def settings_for(url: str, fake: FakeSmsc, **extra: str) -> ProviderSettings:
    env = {"SMSBUS_SMSC_URL": url, "SMSBUS_SMSC_LOGIN": fake.login,
           "SMSBUS_SMSC_PASSWORD": fake.password, **extra}  # fmt: skip
    return load_settings(env).providers["smsc"]


def history_polls(fake: FakeSmsc, url: str, polls: int, **extra: str) -> list[list[StatusReport]]:
    """`polls` history polls of a real client against the fake, a minute apart as far as the
    three-identical-requests rule goes."""

    async def run() -> list[list[StatusReport]]:
        async with httpx.AsyncClient() as http:
            client = Client(settings_for(url, fake, **extra), http)
            found = []
            for _ in range(polls):
                fake._identical.clear()
                client._guard = RateGuard()
                reports, _, failed = await client.history()
                assert failed is None
                found.append(reports)
            return found

    return asyncio.run(run())


def test_one_id_sent_to_several_numbers_is_a_report_per_number(
    smsc: tuple[FakeSmsc, str],
) -> None:
    fake, url = smsc
    fake.send(4242, ["380501111111", "380502222222"], status=1)
    [reports] = history_polls(fake, url, 1)
    assert {("4242", "380501111111", "1"), ("4242", "380502222222", "1")} == {
        (r.message_id, r.phone, r.raw_status) for r in reports
    }


@pytest.mark.parametrize("honours_charset", [True, False])
def test_cyrillic_answers_read_in_utf8_or_windows_1251(
    smsc: tuple[FakeSmsc, str], honours_charset: bool
) -> None:
    fake, url = smsc
    fake.honours_charset = honours_charset
    fake.send(77, ["380503333333"], status=20, status_name="Абонент недоступний")
    fake.change(77, "380503333333", 20, err=1)
    [[report]] = history_polls(fake, url, 1)
    assert ("20", "1", "Абонент недоступний") == (
        report.raw_status,
        report.error_code,
        report.error,
    )
    assert all(f.get("charset") == "utf-8" for f in fake.forms)


def test_the_whole_ttl_window_is_swept_in_pages_whatever_the_ids(
    smsc: tuple[FakeSmsc, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pollers import smsc as module

    fake, url = smsc
    monkeypatch.setattr(module, "MAX_SWEEP", 4)
    now = datetime.now(KYIV)
    ids = random.Random(3).sample(range(10_000, 99_999), 1_500)  # not ordered like int_id
    for n, message_id in enumerate(ids):  # 15 pages, spread over the last 2.9 days
        fake.send(message_id, [f"38050{n:07d}"], status=0, sent=now - timedelta(hours=70 - n / 25))
    oldest = ids[0]
    fake.change(oldest, "380500000000", 1)  # a change on day 3, on the last page
    polls = history_polls(fake, url, 4)
    seen = [{r.message_id for r in reports} for reports in polls]
    assert set(map(str, ids)) == set().union(*seen)  # every row read, no page skipped
    assert str(oldest) in set().union(*seen[:4])
    prev_ids = [f["prev_id"] for f in fake.pages() if "prev_id" in f]
    int_ids = {str(r["int_id"]) for r in fake.history}
    assert prev_ids and set(prev_ids) <= int_ids  # paged by the global id the answer carries
    start = (now - timedelta(days=3)).strftime("%d.%m.%Y")
    assert {start} == {f["start"] for f in fake.pages()}
    assert 0 == fake.refused


def test_a_history_row_that_cannot_be_read_is_set_aside(
    smsc: tuple[FakeSmsc, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The history lists every message of the account: a row that cannot be read must not stop
    the statuses behind it (the page failing whole, every poll, until the row left the
    window). It is set aside with its JSON, on the newest pages and in the sweep, and the pages
    still follow one another."""
    from pollers import smsc as module

    fake, url = smsc
    monkeypatch.setattr(module, "MAX_SWEEP", 2)
    now = datetime.now(KYIV)
    for n in range(401):  # 5 pages: 3 newest, then the sweep, whose last page holds one row
        fake.send(50_000 + n, [f"38050{n:07d}"], status=1, sent=now - timedelta(minutes=450 - n))
    fake.history[5].update(last_timestamp=0, last_date="31.02.2026 25:61:00")  # newest page
    del fake.history[400]["status"]  # alone on the sweep's last page
    bad = {str(fake.history[5]["id"]), str(fake.history[400]["id"])}

    async def run() -> list[tuple[list[StatusReport], list[ProviderRowError]]]:
        async with httpx.AsyncClient() as http:
            client = Client(settings_for(url, fake), http)
            found = []
            for _ in range(2):
                fake._identical.clear()
                client._guard = RateGuard()
                reports, unreadable, failed = await client.history()
                assert failed is None
                found.append((reports, unreadable))
            return found

    (first, told), (second, again) = asyncio.run(run())
    read = {r.message_id for r in first} | {r.message_id for r in second}
    assert {str(50_000 + n) for n in range(401)} - bad == read
    assert 2 == len(told) and [t.raw for t in told] == [t.raw for t in again]
    assert {"a history row lacks id or status", "date '31.02.2026 25:61:00' is not in the "
            "documented form"} == {str(t) for t in told}  # fmt: skip
    assert all(orjson.loads(t.raw or b"")["id"] in {int(b) for b in bad} for t in told)


def test_a_probe_none_of_whose_rows_can_be_read_fails() -> None:
    body = httpx.Response(
        200, json=[row(7, 1, last_date="x", last_timestamp=0), row(8, 1, id=None)]
    ).content
    with pytest.raises(ProviderPayloadError, match="no row can be read"):
        parse_history(body, KYIV)


def test_inbound_asks_for_a_week_beside_the_last_id(smsc: tuple[FakeSmsc, str]) -> None:
    fake, url = smsc
    received = (datetime.now(KYIV) - timedelta(hours=30)).strftime("%d.%m.%Y %H:%M:%S")
    fake.answers = [
        {"id": 56, "received": received, "phone": "380501234567", "message": "так",
         "to_phone": "380441234567", "sent": received},
    ]  # fmt: skip

    async def run() -> InboundRead:
        async with httpx.AsyncClient() as http:
            return await Client(settings_for(url, fake), http).inbound("55")

    found, cursor, _ = asyncio.run(run())
    assert (["56"], "56") == ([m.message_id for m in found], cursor)  # yesterday's too
    [form] = [f for f in fake.forms if f.get("get_answers")]
    assert ("55", "168") == (form["after_id"], form["hour"])


@pytest.mark.parametrize("blank", [False, True])
def test_no_inbound_sms_is_an_empty_list_or_nothing_at_all(
    smsc: tuple[FakeSmsc, str], blank: bool
) -> None:
    """get_answers documents no "not found": an account with no SMS may get `[]` or a blank
    answer. Neither is a failed call (which would back off the history's polls too); the
    cursor stays where it was, and the next SMS is read."""
    fake, url = smsc
    fake.blank_when_no_answers = blank

    async def run() -> InboundRead:
        async with httpx.AsyncClient() as http:
            return await Client(settings_for(url, fake), http).inbound("55")

    assert ([], "55", []) == asyncio.run(run())
    received = datetime.now(KYIV).strftime("%d.%m.%Y %H:%M:%S")
    fake.answers = [
        {"id": 56, "received": received, "phone": "380501234567", "message": "да",
         "to_phone": "380441234567", "sent": received},
    ]  # fmt: skip
    found, cursor, _ = asyncio.run(run())
    assert (["56"], "56") == ([m.message_id for m in found], cursor)


@pytest.mark.slow
def test_history_inbound_and_the_rate_rule(
    nats_server: NatsServer, tmp_path: Path, smsc: tuple[FakeSmsc, str]
) -> None:
    fake, url = smsc
    for n in range(150):  # two pages
        fake.send(900000 - n, [f"3805012{n:05d}"], status=1 if n % 2 else 0)
    fake.send(4242, ["380501111111", "380502222222"], status=1)  # one id, two numbers
    fake.history[70]["status"] = None  # a row that cannot be read: set aside, a dead letter
    received = datetime.now(KYIV).strftime("%d.%m.%Y %H:%M:%S")
    fake.answers = [
        {"id": 55, "received": received, "phone": "380501234567", "message": "так",
         "to_phone": "380441234567", "sent": received}
    ]  # fmt: skip
    env = isolated_env(
        nats_server.url,
        SMSBUS_SMSC_URL=url,
        SMSBUS_SMSC_LOGIN=fake.login,
        SMSBUS_SMSC_PASSWORD=fake.password,
        SMSBUS_SMSC_INTERVAL="21",
    )
    bus = Smsbus(env, tmp_path)
    bus.start()
    try:
        bus.register({"provider": "smsc", "message_id": "4242", "client_ref": "c-9"})

        def statuses() -> dict[tuple[str, str], dict]:
            found = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.smsc.>")
            return {(s.event["subject"], s.event["data"]["phone"]): s.event["data"] for s in found}

        wait_for(lambda: len(statuses()) == 151, what="151 statuses")
        [letter] = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.deadletter.smsc")
        assert "a history row lacks id or status" == letter.event["data"]["reason"]
        assert fake.history[70]["id"] == orjson.loads(letter.event["data"]["raw"]["body"])["id"]
        got = statuses()
        assert {"delivered", "sent"} == {d["status"] for d in got.values()}
        both = [got[("4242", p)] for p in ("380501111111", "380502222222")]
        assert 2 == len({d["phone"] for d in both})  # two events: one per number
        one = httpx.get(f"{bus.api}/v1/messages/smsc/4242/380502222222").json()
        whole = httpx.get(f"{bus.api}/v1/messages/smsc/4242").json()
        assert ("delivered", True) == (one["status"], one["final"])
        assert ("delivered", True, "c-9") == (whole["status"], whole["final"], whole["client_ref"])
        [answer] = wait_for(
            lambda: read_stream(nats_server.url, bus.stream, f"{bus.prefix}.inbound.smsc"),
            what="the inbound SMS",
        )
        assert ("55", "так") == (answer.event["data"]["message_id"], answer.event["data"]["text"])
        md5 = hashlib.md5(fake.password.encode()).hexdigest()
        assert all(f["psw"] == md5 and f.get("fmt") == "3" for f in fake.forms)
        assert all(fake.password not in q and md5 not in q for q in fake.queries)
        first_two = [f.get("prev_id") for f in fake.pages()][:2]
        assert first_two[0] is None and first_two[1] == str(fake.history[99]["int_id"])
        assert 0 == fake.refused
        assert fake.password not in bus.logs()
    finally:
        assert 0 == bus.stop()


def test_the_pages_read_before_a_page_fails_are_published(
    nats_server: NatsServer, tmp_path: Path, smsc: tuple[FakeSmsc, str]
) -> None:
    """Five pages of history; the sweep's second page (the fifth) answers 503 once. The poll
    fails and backs off as any does, but the four pages read before it are published first:
    the sweep goes on from the failing page, and the page it had read would otherwise wait a
    whole sweep (up to SMSBUS_SMSC_MAX_INTERVAL) to be read again."""
    fake, url = smsc
    now = datetime.now(KYIV)
    for n in range(450):
        fake.send(600_000 + n, [f"38050{n:07d}"], status=1, sent=now - timedelta(minutes=n),
                  sort=False)  # fmt: skip
    fake.sort()
    fake.failing_pages[str(fake.history[399]["int_id"])] = 1
    env = isolated_env(nats_server.url, SMSBUS_SMSC_URL=url, SMSBUS_SMSC_LOGIN=fake.login,
                       SMSBUS_SMSC_PASSWORD=fake.password, SMSBUS_SMSC_INTERVAL="21")  # fmt: skip
    bus = Smsbus(env, tmp_path)
    bus.start()
    try:
        wait_for(lambda: bus.metric("smsbus_poll_requests_total", outcome="unavailable",
                                    provider="smsc") == 1, what="the failed page")  # fmt: skip
        # Before: none (the poll gave up what it had read).
        assert 400 == bus.metric("smsbus_events_published_total", type="status", provider="smsc")
        assert "answered HTTP 503" in bus.readyz()["providers"]["smsc"]["last_error"]
        wait_for(lambda: bus.metric("smsbus_events_published_total", type="status",
                                    provider="smsc") == 450,
                 timeout=40, what="the rest, at the next poll")  # fmt: skip
        stored = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.smsc.>")
        assert 450 == len({s.event["id"] for s in stored}) == len(stored)
    finally:
        assert 0 == bus.stop()


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 1001])
def test_a_history_none_of_whose_rows_can_be_read(
    nats_server: NatsServer, tmp_path: Path, smsc: tuple[FakeSmsc, str], rows: int
) -> None:
    """An account that sent one SMS in three days, its row not in the document's form: the row
    is told of (a dead letter with its JSON) and the poll is not a failed call, which would back
    off inbound polls with it; 1,001 such rows and none readable are a changed form, and fail."""
    fake, url = smsc
    for n in range(rows):
        fake.send(700_000 + n, [f"38050{n:07d}"], status=1, sort=False)
    fake.sort()
    for row_ in fake.history:
        del row_["status"]
    env = isolated_env(nats_server.url, SMSBUS_SMSC_URL=url, SMSBUS_SMSC_LOGIN=fake.login,
                       SMSBUS_SMSC_PASSWORD=fake.password, SMSBUS_SMSC_INTERVAL="21")  # fmt: skip
    bus = Smsbus(env, tmp_path)
    bus.start()
    try:
        letters = wait_for(
            lambda: read_stream(nats_server.url, bus.stream, f"{bus.prefix}.deadletter.smsc"),
            what="the history told of",
        )
        ok = 2 if rows == 1 else 1  # the history's and the inbound poll's, or the inbound's
        wait_for(lambda: ok == bus.metric("smsbus_poll_requests_total", outcome="ok",
                                          provider="smsc"), what="the polls done")  # fmt: skip
        [letter] = letters
        reason = letter.event["data"]["reason"]
        row_id = orjson.loads(letter.event["data"]["raw"]["body"])["id"]
        if rows == 1:
            assert "a history row lacks id or status" == reason
            assert 700_000 == row_id
            assert "provider call failed" not in bus.logs()
        else:
            assert reason.startswith("1001 history rows, none of which can be read: ")
            assert 701_000 == row_id  # the newest
            assert "provider call failed" in bus.logs()
        assert 1 == bus.metric("smsbus_poll_requests_total", outcome="bad_answer", provider="smsc")
    finally:
        assert 0 == bus.stop()


def test_an_smsc_interval_below_21_is_refused(tmp_path: Path) -> None:
    from tests.test_startup import serve

    result = serve(tmp_path, SMSBUS_SMSC_INTERVAL="20")
    assert 2 == result.returncode
    assert result.stderr.startswith("smsbus: SMSBUS_SMSC_INTERVAL: must be at least 21 s")


def test_the_guard_holds_back_a_fourth_identical_request(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from pollers import smsc

    clock = [1000.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(smsc.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(smsc.asyncio, "sleep", sleep)
    guard = smsc.RateGuard()

    async def run() -> None:
        for _ in range(3):
            await guard.admit({"get_answers": "1", "after_id": "5"})
            clock[0] += 10
        await guard.admit({"get_answers": "1", "after_id": "6"})  # another request: no wait
        await guard.admit({"get_answers": "1", "after_id": "5"})  # the 4th identical one waits

    asyncio.run(run())
    assert 1 == len(slept)
    assert 30 < slept[0] <= 30.2  # until the first of the three is a minute old
