"""SMSC: the fmt=3 parsers and error shapes; the history poller, inbound and the rate rule."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from bus.errors import ProviderAuthError, ProviderPayloadError, ProviderUnavailable
from pollers.smsc import parse_answers, parse_history
from pollers.types import InboundSms, StatusReport
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


def test_inbound_row() -> None:
    # smsc.txt "Получение входящих сообщений", fmt=3.
    body = httpx.Response(
        200,
        json=[{"id": 1234568, "received": "22.11.2026 12:00:09", "phone": "380501234567",
               "message": "СТОП", "to_phone": "380441234567", "sent": "22.11.2026 12:00:07"}],
    ).content  # fmt: skip
    assert [
        InboundSms(
            "1234568", "380501234567", "380441234567", "СТОП",
            datetime(2026, 11, 22, 10, 0, 7, tzinfo=UTC),
        )
    ] == parse_answers(body, KYIV)  # fmt: skip


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


@pytest.mark.slow
def test_history_inbound_and_the_rate_rule(
    nats_server: NatsServer, tmp_path: Path, smsc: tuple[FakeSmsc, str]
) -> None:
    fake, url = smsc
    fake.history = [row(900000 - i, 1 if i % 2 else 0) for i in range(150)]  # two pages
    fake.answers = [
        {"id": 55, "received": "22.11.2026 12:00:09", "phone": "380501234567", "message": "так",
         "to_phone": "380441234567", "sent": "22.11.2026 12:00:07"}
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
        httpx.post(
            f"{bus.api}/v1/messages",
            json={"provider": "smsc", "message_id": "899999", "client_ref": "c-9"},
        )

        def statuses() -> dict[str, dict]:
            found = read_stream(nats_server.url, bus.stream, f"{bus.prefix}.status.smsc.>")
            return {s.event["subject"]: s.event["data"] for s in found}

        wait_for(lambda: len(statuses()) == 150, what="150 statuses")
        got = statuses()
        assert {"delivered", "sent"} == {d["status"] for d in got.values()}
        [answer] = wait_for(
            lambda: read_stream(nats_server.url, bus.stream, f"{bus.prefix}.inbound.smsc"),
            what="the inbound SMS",
        )
        assert ("55", "так") == (answer.event["data"]["message_id"], answer.event["data"]["text"])
        md5 = hashlib.md5(fake.password.encode()).hexdigest()
        assert all(f["psw"] == md5 and f.get("fmt") == "3" for f in fake.forms)
        assert all(fake.password not in q and md5 not in q for q in fake.queries)
        assert [None, "899901"] == [f.get("prev_id") for f in fake.forms if f.get("get_messages")][
            :2
        ]
        assert 0 == fake.refused
        assert fake.password not in bus.logs()
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
