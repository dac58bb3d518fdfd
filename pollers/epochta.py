"""ePochta (epochta.txt): statuses by messageId (GETSTATUS) and the balance in credits (BALANCE).

Every call POSTs one XML document in the form field `XML` to /members/sms/xml.php, credentials
inside the document. Failures come back as `<RESPONSE><status>N</status></RESPONSE>` with a
negative N; delivery reports as `<deliveryreport><message id= sentdate= donedate= status=/>`,
dates `yyyy-mm-dd hh:mm:ss` in SMSBUS_EPOCHTA_TZ. The document sets no batch limit; we send 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from functools import partial
from zoneinfo import ZoneInfo

import httpx
from lxml import etree

from bus.config import ProviderSettings
from bus.errors import ProviderAuthError, ProviderPayloadError
from pollers import http
from pollers.types import Balance, PerId, Provider, StatusReport
from pollers.values import balance_text, decimal, local
from pollers.xml import parse_xml, text

PATH = "/members/sms/xml.php"
DATE = "%Y-%m-%d %H:%M:%S"
BATCH = 100

# The <status> values of a RESPONSE (epochta.txt tables).
FAILURES = {
    "-1": "AUTH_FAILED: wrong login or password",
    "-2": "XML_ERROR: the request XML was refused",
    "-3": "NOT_ENOUGH_CREDITS",
    "-4": "NO_RECIPIENTS",
}


def request(operation: str, username: str, password: str, message_ids: Sequence[str] = ()) -> bytes:
    """The XML document of one operation, built by lxml so every value is escaped."""
    sms = etree.Element("SMS")
    etree.SubElement(etree.SubElement(sms, "operations"), "operation").text = operation
    auth = etree.SubElement(sms, "authentication")
    etree.SubElement(auth, "username").text = username
    etree.SubElement(auth, "password").text = password
    if message_ids:
        statistics = etree.SubElement(sms, "statistics")
        for message_id in message_ids:
            etree.SubElement(statistics, "messageid").text = message_id
    return bytes(etree.tostring(sms, xml_declaration=True, encoding="UTF-8"))


def _failure(root: etree._Element) -> None:
    """Raise for a RESPONSE whose status is a documented failure."""
    if root.tag != "RESPONSE":
        return
    status = text(root, "status")
    if status == "-1":
        raise ProviderAuthError(f"status -1: {FAILURES['-1']}")
    if status is not None and status.lstrip("-").isdecimal() and int(status) < 0:
        raise ProviderPayloadError(f"status {status}: {FAILURES.get(status, 'undocumented')}")


def parse_status(body: bytes, tz: ZoneInfo) -> list[StatusReport]:
    root = parse_xml(body)
    _failure(root)
    if root.tag != "deliveryreport":
        raise ProviderPayloadError(f"expected <deliveryreport>, got <{root.tag}>")
    return http.rows(partial(_report, tz=tz), root.iterfind("message"))


def _report(message: etree._Element, tz: ZoneInfo) -> StatusReport:
    message_id, status = message.get("id"), message.get("status")
    if not message_id or not status:
        raise ProviderPayloadError("a message lacks its id or status")
    occurred = local(message.get("donedate"), DATE, tz) or local(message.get("sentdate"), DATE, tz)
    return StatusReport(message_id, status.strip(), occurred)


def parse_balance(body: bytes) -> Decimal:
    root = parse_xml(body)
    _failure(root)
    if root.tag != "RESPONSE" or text(root, "status") != "0":
        raise ProviderPayloadError("balance answer without status 0")
    return decimal(text(root, "credits"), "credits")


class Client:
    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client

    async def _call(self, operation: str, message_ids: Sequence[str] = ()) -> bytes:
        username, password = (s.reveal() for s in self._settings.credentials)
        document = request(operation, username, password, message_ids)
        return await http.post(
            self._http, self._settings.url + PATH, form={"XML": document.decode()}
        )

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        body = await self._call("GETSTATUS", ids)
        return http.parsed(body, lambda: parse_status(body, self._settings.tz))

    async def balance(self) -> Decimal:
        body = await self._call("BALANCE")
        return http.parsed(body, lambda: parse_balance(body))


def provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    pochta = Client(settings, client)
    return Provider(
        name="epochta",
        check=lambda: balance_text(pochta.balance, "credits"),
        statuses=PerId(pochta.statuses, BATCH),
        balance=Balance(pochta.balance, "credits"),
    )
