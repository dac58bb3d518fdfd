"""SMSTOWER (smstower.txt): statuses by message id, inbound SMS by date range, balance in SMS.

Every method is a form POST with `login` and `password` in the body ("Доступные методы: POST");
answers are UTF-8 XML `<response><code>…</code>…</response>`, dates `YYYY-MM-DD HH:MI:SS` in
SMSBUS_SMSTOWER_TZ.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from zoneinfo import ZoneInfo

import httpx
from lxml import etree

from bus.config import ProviderSettings
from bus.errors import (
    ProviderAuthError,
    ProviderPayloadError,
    ProviderRowError,
    ProviderUnavailable,
)
from pollers import http
from pollers.types import Balance, InboundRead, InboundSms, PerId, Provider, StatusReport
from pollers.values import balance_text, decimal, format_local, local
from pollers.window import Window
from pollers.xml import fields, parse_xml, text

STATUS = "/getstatus.v2.php"
INBOUND = "/incomingsms.php"
BALANCE = "/getbalance.php"
DATE = "%Y-%m-%d %H:%M:%S"
MAX_IDS = 100  # getstatus.v2.php: "максимальное количество … идентификаторов равно 100"

# Answer codes, per method (the document lists them under each method).
AUTH = {"4": "wrong login or password", "7": "this IP address may not use the API"}
STATUS_ERRORS = {
    "2": "no message ids given",
    "3": "a message id is not a number",
    "8": "more than 100 message ids",
    "10": "technical problem at the gateway",
}
INBOUND_ERRORS = {
    "8": "bad start date",
    "9": "bad end date",
    "10": "technical problem at the gateway",
}
BALANCE_ERRORS = {"10": "technical problem at the gateway"}
NONE_FOUND = "9"  # getstatus: "Ни один идентификатор не найден в БД" - not known yet


def _checked(body: bytes, errors: dict[str, str], *, ok: str = "1") -> etree._Element:
    return _answered(parse_xml(body), errors, ok=ok)


def _answered(root: etree._Element, errors: dict[str, str], *, ok: str = "1") -> etree._Element:
    code = text(root, "code")
    if code == ok:
        return root
    if code in AUTH:
        raise ProviderAuthError(f"code {code}: {AUTH[code]}")
    if code == "10":
        raise ProviderUnavailable(f"code 10: {errors['10']}")
    meaning = errors.get(code or "", "undocumented code")
    raise ProviderPayloadError(f"code {code}: {meaning}")


def parse_status(body: bytes, tz: ZoneInfo) -> list[StatusReport]:
    """getstatus.v2.php's answer: one report per message; code 9 means none known yet."""
    root = parse_xml(body)
    if text(root, "code") == NONE_FOUND:
        return []
    _answered(root, STATUS_ERRORS)
    return http.rows(partial(_status_row, tz=tz), root.iterfind("messageList/message"))


def _status_row(message: etree._Element, tz: ZoneInfo) -> StatusReport:
    found = fields(message)
    message_id, status = found.get("idMessage"), found.get("deliveryStatus")
    if not message_id or not status:
        raise ProviderPayloadError("a message lacks idMessage or deliveryStatus")
    return StatusReport(message_id, status, local(found.get("dateFinalStatus"), DATE, tz))


def parse_inbound(body: bytes, tz: ZoneInfo) -> tuple[list[InboundSms], list[ProviderRowError]]:
    """The inbound SMS listed, and the rows that could not be read (set aside)."""
    root = _checked(body, INBOUND_ERRORS)
    return http.each(partial(_inbound_row, tz=tz), root.iterfind("messageList/message"), _xml)


def _inbound_row(message: etree._Element, tz: ZoneInfo) -> InboundSms:
    message_id = text(message, "idMessage")
    if not message_id:
        raise ProviderPayloadError("an inbound message lacks idMessage")
    return InboundSms(
        message_id=message_id,
        sender=text(message, "sourceAddress") or "",
        recipient=text(message, "destinationAddress") or "",
        text=text(message, "smsText") or "",
        sent_at=local(text(message, "createdDate"), DATE, tz),
    )


def _xml(element: etree._Element) -> bytes:
    return bytes(etree.tostring(element, encoding="UTF-8", with_tail=False))


def parse_balance(body: bytes) -> Decimal:
    root = _checked(body, BALANCE_ERRORS)
    return decimal(text(root, "balance"), "balance")


class Client:
    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client

    async def _post(self, path: str, **fields: str) -> bytes:
        login, password = (s.reveal() for s in self._settings.credentials)
        auth = {"login": login, "password": password}
        return await http.post(self._http, self._settings.url + path, form=auth | fields)

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        body = await self._post(STATUS, messageid=",".join(ids))
        return http.parsed(body, lambda: parse_status(body, self._settings.tz))

    async def inbound(self, cursor: str | None) -> InboundRead:
        window = Window(cursor, datetime.now(UTC))
        tz = self._settings.tz
        body = await self._post(
            INBOUND,
            startDate=format_local(window.start, DATE, tz),
            endDate=format_local(window.now, DATE, tz),
        )
        found, unreadable = http.parsed(body, lambda: parse_inbound(body, tz))
        return (*window.take(found, unreadable), unreadable)

    async def balance(self) -> Decimal:
        body = await self._post(BALANCE)
        return http.parsed(body, lambda: parse_balance(body))


def provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    tower = Client(settings, client)
    return Provider(
        name="smstower",
        check=lambda: balance_text(tower.balance, "SMS"),
        statuses=PerId(tower.statuses, MAX_IDS),
        inbound=tower.inbound,
        balance=Balance(tower.balance, "SMS"),
    )
