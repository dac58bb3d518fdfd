"""SMS-Pager (smspager.txt): delivery reports by mailing and the balance, over HTTPS with XML
bodies POSTed to /report.xml and /balance.xml, the credentials inside the XML.

A mailing (its `smsid`) covers several numbers. The general report (`start`/`stop`) lists every
mailing's counters; the detailed report (one `smsid`) lists its numbers by group (`delivered`,
`notDelivered`, `waiting`, `enqueued`, `cancel`, `onModer`). So each poll first reads the general
report: when no counter changed since the last one, the due mailings are left alone; otherwise,
and for a mailing never detailed yet, its detailed report is read, giving one report per number.
The general report names mailings by the system's own ids, not the smsid given at sending, so it
can only tell that something changed, not what.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import ClassVar

import httpx
from lxml import etree

from bus.config import ProviderSettings
from bus.errors import ProviderAuthError, ProviderPayloadError
from bus.messages import digits
from pollers import http
from pollers.types import InboundSms, StatusReport
from pollers.values import decimal
from pollers.xml import parse_xml, text

REPORT = "/report.xml"
BALANCE = "/balance.xml"
GROUPS = ("delivered", "notDelivered", "waiting", "enqueued", "cancel", "onModer")
COUNTERS = ("allCol", "deliveredCol", "notDeliveredCol", "waitingCol", "enqueuedCol")
BATCH = 20  # mailings per poll: one general report, then a detailed report each
LOOK_BACK = timedelta(days=7)

# "РЕЗУЛЬТАТ ОБРАБОТКИ": 1 success; 500-504; 70x-70xx are XML parser errors.
CODES = {
    "500": "not enough parameters",
    "501": "wrong login or password",
    "502": "smsid longer than 21 characters",
    "503": "bad datetime format",
    "504": "sender address not allowed",
}


def request(login: str, password: str, **fields: str) -> bytes:
    """`<data>` with the credentials and the fields, built by lxml so every value is escaped."""
    data = etree.Element("data")
    etree.SubElement(data, "login").text = login
    etree.SubElement(data, "password").text = password
    for name, value in fields.items():
        etree.SubElement(data, name).text = value
    return bytes(etree.tostring(data, xml_declaration=True, encoding="UTF-8"))


def _checked(body: bytes) -> etree._Element:
    root = parse_xml(body)
    code = text(root, "code")
    if code == "1":
        return root
    if code == "501":
        raise ProviderAuthError(f"code 501: {CODES['501']}")
    if code and code.startswith("70"):
        raise ProviderPayloadError(f"code {code}: the XML parser refused our request")
    raise ProviderPayloadError(f"code {code}: {CODES.get(code or '', 'undocumented code')}")


def parse_general(body: bytes) -> dict[str, tuple[str, ...]]:
    """The general report: each mailing's counters, by the system's mailing id."""
    root = _checked(body)
    counters = {}
    for sms in root.iterfind("sms"):
        system_id = text(sms, "smsid")
        if not system_id:
            raise ProviderPayloadError("a mailing lacks its smsid")
        counters[system_id] = tuple(text(sms, c) or "" for c in COUNTERS)
    return counters


def parse_detail(body: bytes, smsid: str) -> list[StatusReport]:
    """The detailed report of one mailing: one report per number, its group as the status."""
    root = _checked(body)
    reports = []
    detail = root.find("detail")
    for group in detail if detail is not None else []:
        if not isinstance(group.tag, str):
            continue
        for number in group.iterfind("number"):
            phone = digits(number.text or "")
            if not phone:
                raise ProviderPayloadError(f"a number in <{group.tag}> has no digits")
            reports.append(StatusReport(smsid, group.tag, None, phone=phone))
    return reports


def parse_balance(body: bytes) -> Decimal:
    return decimal(text(_checked(body), "account"), "account")


class Client:
    name: ClassVar[str] = "smspager"
    status_batch: ClassVar[int] = BATCH
    balance_unit: ClassVar[str | None] = "RUB"
    has_inbound: ClassVar[bool] = False
    has_history: ClassVar[bool] = False

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client
        self._login, self._password = (s.reveal() for s in settings.credentials)
        self._counters: dict[str, tuple[str, ...]] | None = None
        self._general_at = 0.0
        self._changed = True
        self._detailed: set[str] = set()

    async def _post(self, path: str, **fields: str) -> bytes:
        document = request(self._login, self._password, **fields)
        return await http.post(
            self._http, self._settings.url + path, content=document, content_type="application/xml"
        )

    async def _something_changed(self) -> bool:
        """Read the general report (at most once per half interval); True if any counter moved."""
        if time.monotonic() - self._general_at < self._settings.interval / 2:
            return self._changed
        today = datetime.now(self._settings.tz)
        body = await self._post(
            REPORT,
            start=(today - LOOK_BACK).strftime("%Y-%m-%d"),
            stop=today.strftime("%Y-%m-%d"),
        )
        counters = http.parsed(body, lambda: parse_general(body))
        self._changed = counters != self._counters
        self._counters = counters
        self._general_at = time.monotonic()
        return self._changed

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        changed = await self._something_changed()
        reports: list[StatusReport] = []
        for smsid in ids:
            if not changed and smsid in self._detailed:
                continue
            body = await self._post(REPORT, smsid=smsid)
            reports.extend(http.parsed(body, partial(parse_detail, body, smsid)))
            self._detailed.add(smsid)
        return reports

    async def history(self) -> list[StatusReport]:
        return []

    async def inbound(self, cursor: str | None) -> tuple[list[InboundSms], str | None]:
        return [], cursor

    async def balance(self) -> Decimal:
        body = await self._post(BALANCE)
        return http.parsed(body, lambda: parse_balance(body))
