"""SMSPilot (smspilot.txt, api2.php): reconcile statuses a callback never brought, inbound SMS,
balance in roubles. Requests are JSON bodies POSTed to /api2.php with `apikey` inside.

`check` with a list of server_ids answers `{"check": [{id, server_id, status, modified}]}`,
`modified` in SMSBUS_SMSPILOT_TZ; `inbound` with `since` (GMT, as the document says) lists inbound
SMS, `created` in Moscow time; `balance: "rur"` answers `{"balance": 405.60}`. Errors come as
`{"error": {"code": N, "description": "…"}}` with the codes of the document's error table.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from bus.config import ProviderSettings
from bus.errors import ProviderAuthError, ProviderError, ProviderPayloadError, ProviderRowError
from bus.statuses import SMSPILOT_ERRORS
from pollers import http
from pollers.types import Balance, InboundRead, InboundSms, PerId, Provider, StatusReport
from pollers.values import balance_text, decimal, format_local, local
from pollers.window import Window

PATH = "/api2.php"
DATE = "%Y-%m-%d %H:%M:%S"
INBOUND_DATE = "%Y-%m-%d %H:%M"  # the document's examples: "2011-09-20 20:15"
BATCH = 100
NOT_FOUND = "302"  # "SMS server_id not found": not known yet, or older than 40 days
MOSCOW = ZoneInfo("Europe/Moscow")
AUTH_CODES = {"400", "401"}


def _error_code(data: dict[str, Any]) -> str | None:
    error = data.get("error")
    if error is None:
        return None
    return str(error.get("code", "")) if isinstance(error, dict) else str(error)


def _answer(body: bytes, *, empty_on: str | None = None) -> dict[str, Any]:
    """The JSON object of an answer; an error raises, except `empty_on`, which is an empty {}."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProviderPayloadError("answer is not JSON") from None
    if not isinstance(data, dict):
        raise ProviderPayloadError("answer is not a JSON object")
    code = _error_code(data)
    if code is not None and code == empty_on:
        return {}
    if code is not None:
        text = SMSPILOT_ERRORS.get(code, "undocumented error")
        if code in AUTH_CODES:
            raise ProviderAuthError(f"error {code}: {text}")
        raise ProviderPayloadError(f"error {code}: {text}")
    return data


class NotFound(ProviderError):
    """A check answered 302: at least one of its server_ids is not known (yet). Never leaves
    Client.statuses, which narrows the batch down instead."""


def parse_check(body: bytes, tz: ZoneInfo) -> list[StatusReport]:
    """A check's rows; NotFound when the answer is error 302."""
    data = _answer(body, empty_on=NOT_FOUND)
    if not data:
        raise NotFound()
    rows = data.get("check")
    if not isinstance(rows, list):
        raise ProviderPayloadError("check answer without a list")
    return http.rows(partial(_check_row, tz=tz), rows)


def _check_row(row: Any, tz: ZoneInfo) -> StatusReport:
    if not isinstance(row, dict) or not row.get("server_id") or row.get("status") is None:
        raise ProviderPayloadError("a check row lacks server_id or status")
    status = str(row["status"]).strip()
    if not status.lstrip("-").isdecimal():
        raise ProviderPayloadError("a check row's status is not a number")
    occurred = local(str(row.get("modified") or ""), DATE, tz)
    error = str(row.get("error") or "").strip()
    code = error if error.isdecimal() and error != "0" else None
    return StatusReport(
        str(row["server_id"]), str(int(status)), occurred,
        error_code=code, error=SMSPILOT_ERRORS.get(code or ""),
    )  # fmt: skip


def parse_inbound(
    body: bytes, tz: ZoneInfo = MOSCOW
) -> tuple[list[InboundSms], list[ProviderRowError]]:
    """The inbound SMS listed, and the rows that could not be read (set aside). `created` is
    Moscow time, whatever SMSBUS_SMSPILOT_TZ says: "время создания записи (мск)"."""
    rows = _answer(body).get("inbound")
    if rows is None or rows is True:
        return [], []
    if not isinstance(rows, list):
        raise ProviderPayloadError("inbound answer without a list")
    return http.each(partial(_inbound_row, tz=tz), rows, orjson.dumps)


def _inbound_row(row: Any, tz: ZoneInfo) -> InboundSms:
    if not isinstance(row, dict) or not row.get("id"):
        raise ProviderPayloadError("an inbound row lacks its id")
    created = str(row.get("created") or "")
    fmt = DATE if created.count(":") == 2 else INBOUND_DATE
    return InboundSms(
        message_id=str(row["id"]),
        sender=str(row.get("phone") or ""),
        recipient=str(row.get("num") or ""),
        text=str(row.get("text") or ""),
        sent_at=local(created, fmt, tz),
    )


def parse_balance(body: bytes) -> Decimal:
    return decimal(_answer(body).get("balance"), "balance")


class Client:
    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client

    async def _call(self, **request: Any) -> bytes:
        (apikey,) = (s.reveal() for s in self._settings.credentials)
        body = orjson.dumps({"apikey": apikey, **request})
        return await http.post(
            self._http, self._settings.url + PATH, content=body, content_type="application/json"
        )

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        """A check of the ids. Error 302 names no id, so a batch that gets it is halved until
        the unknown ids are alone: one unknown id never holds back the known ones (they stay
        tracked, and asked about again, until known or expired)."""
        body = await self._call(check=[{"server_id": i} for i in ids])
        try:
            return http.parsed(body, lambda: parse_check(body, self._settings.tz))
        except NotFound:
            if len(ids) == 1:
                return []
        half = len(ids) // 2
        return [*await self.statuses(ids[:half]), *await self.statuses(ids[half:])]

    async def inbound(self, cursor: str | None) -> InboundRead:
        window = Window(cursor, datetime.now(UTC))
        body = await self._call(inbound=True, since=format_local(window.start, DATE, UTC))
        found, unreadable = http.parsed(body, lambda: parse_inbound(body))
        return (*window.take(found, unreadable), unreadable)

    async def balance(self) -> Decimal:
        body = await self._call(balance="rur")
        return http.parsed(body, lambda: parse_balance(body))


def provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    pilot = Client(settings, client)
    return Provider(
        name="smspilot",
        check=lambda: balance_text(pilot.balance, "RUB"),
        statuses=PerId(pilot.statuses, BATCH),
        inbound=pilot.inbound,
        balance=Balance(pilot.balance, "RUB"),
    )
