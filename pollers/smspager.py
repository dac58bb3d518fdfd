"""SMS-Pager (smspager.txt): delivery reports by mailing and the balance, over HTTPS with XML
bodies POSTed to /report.xml and /balance.xml, the credentials inside the XML.

A mailing (its `smsid`) covers several numbers. The general report (`start`/`stop`) lists every
mailing's counters, by the system's own ids ("отличается от SMSID, указанного при отправке"), so
it can only tell that *something* changed, not what; the detailed report (one `smsid`) lists its
numbers by group (`delivered`, `notDelivered`, `waiting`, `enqueued`, `cancel`, `onModer`). So:
- each time the general report's counters differ from the last reading, a generation counter
  moves on; a mailing is detailed again when the generation moved since *that mailing* was last
  detailed (one mailing's poll never uses up the change another one needs);
- and at least every SMSBUS_SMSPAGER_MAX_INTERVAL while it is open, whatever the report says:
  no counter moves when moderation cancels a mailing (there is no counter for `cancel` or
  `onModer`);
- the general report covers SMSBUS_TRACK_TTL back, up to tomorrow: `stop` defaults to today and
  its form is a date, which must not cut off today's mailings.

One smsid can also cover a second send to the same numbers (the document's third example: the
same numbers at 12:00 and again at 18:00, "сгруппировать 2 рассылки в 1"). A number is then
listed twice, and a status is known by the smsid and the number alone (CONTRACT.md's message
key), so the two SMS to it cannot be told apart: the mailing is final once each number has a
final status, and what the other send does later is not read. Such a mailing is named in a
warning, once, so that it does not pass unnoticed.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial

import httpx
import structlog
from lxml import etree

from bus.config import ProviderSettings
from bus.errors import ProviderAuthError, ProviderPayloadError, ProviderRowError
from bus.messages import digits
from pollers import http
from pollers.types import Balance, PerId, Provider, StatusReport
from pollers.values import balance_text, decimal
from pollers.xml import parse_xml, text

log = structlog.get_logger("smsbus.poller")

REPORT = "/report.xml"
BALANCE = "/balance.xml"
GROUPS = ("delivered", "notDelivered", "waiting", "enqueued", "cancel", "onModer")
COUNTERS = ("allCol", "deliveredCol", "notDeliveredCol", "waitingCol", "enqueuedCol")
BATCH = 20  # mailings per poll: one general report, then a detailed report each
MAX_REMEMBERED = 100_000  # mailings whose last detailed report we remember (and warned of)
# The general report has a <sms> block of about 300 bytes per mailing in the window, and the
# document sets no limit: room for 200,000 mailings.
GENERAL_LIMIT = 64 * 1024 * 1024

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
    """The detailed report of one mailing: one report per number and group, the group as the
    status."""
    return read_detail(body, smsid)[0]


def read_detail(body: bytes, smsid: str) -> tuple[list[StatusReport], int]:
    """`parse_detail`'s reports, and how many numbers the report lists more than once (sent to
    again under the same smsid)."""
    root = _checked(body)
    reports = []
    listed: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    detail = root.find("detail")
    for group in detail if detail is not None else []:
        if not isinstance(group.tag, str):
            continue
        for number in group.iterfind("number"):
            phone = digits(number.text or "")
            if not phone:
                raise ProviderRowError(f"a number in <{group.tag}> has no digits")
            listed[phone] += 1
            if (phone, group.tag) not in seen:
                seen.add((phone, group.tag))
                reports.append(StatusReport(smsid, group.tag, None, phone=phone))
    return reports, sum(1 for times in listed.values() if times > 1)


def parse_balance(body: bytes) -> Decimal:
    return decimal(text(_checked(body), "account"), "account")


class Client:
    def __init__(
        self,
        settings: ProviderSettings,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._http = client
        self._clock = clock  # when the general report and each mailing were last read
        self._counters: dict[str, tuple[str, ...]] | None = None
        self._general_at = -math.inf
        self.generation = 0  # moves on whenever the general report's counters change
        # smsid -> (generation, monotonic time) of its last detailed report; the oldest first.
        self._detailed: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._resent: OrderedDict[str, None] = OrderedDict()  # mailings warned of, oldest first

    async def _post(self, path: str, limit: int = http.MAX_ANSWER, **fields: str) -> bytes:
        login, password = (s.reveal() for s in self._settings.credentials)
        document = request(login, password, **fields)
        return await http.post(
            self._http, self._settings.url + path, content=document,
            content_type="application/xml", limit=limit,
        )  # fmt: skip

    async def _read_general(self) -> int:
        """The generation, reading the general report at most once per half interval."""
        if self._clock() - self._general_at < self._settings.interval / 2:
            return self.generation
        now = datetime.now(self._settings.tz)
        body = await self._post(
            REPORT,
            limit=GENERAL_LIMIT,
            start=(now - timedelta(seconds=self._settings.track_ttl)).strftime("%Y-%m-%d"),
            stop=(now + timedelta(days=1)).strftime("%Y-%m-%d"),
        )
        counters = http.parsed(body, lambda: parse_general(body))
        if counters != self._counters:
            self.generation += 1
        self._counters = counters
        self._general_at = self._clock()
        return self.generation

    def due(self, smsid: str, generation: int, now: float) -> bool:
        """Detail this mailing now? Never detailed, the report changed since, or too long ago."""
        seen = self._detailed.get(smsid)
        if seen is None:
            return True
        at_generation, at = seen
        return at_generation != generation or now - at >= self._settings.max_interval

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        """The detailed reports of the mailings due. Each counts as detailed only once all of
        them are read: a mailing whose report cannot be read raises, and the reports read
        before it, returned with nothing, must be asked for again."""
        generation = await self._read_general()
        reports: list[StatusReport] = []
        detailed: list[tuple[str, float]] = []
        for smsid in ids:
            now = self._clock()
            if not self.due(smsid, generation, now):
                continue
            body = await self._post(REPORT, smsid=smsid)
            found, twice = http.parsed(body, partial(read_detail, body, smsid))
            reports.extend(found)
            if twice:
                self._warn_resent(smsid, twice)
            detailed.append((smsid, now))
        for smsid, at in detailed:
            self._detailed[smsid] = (generation, at)
            self._detailed.move_to_end(smsid)
        while len(self._detailed) > MAX_REMEMBERED:
            self._detailed.popitem(last=False)
        return reports

    def _warn_resent(self, smsid: str, numbers: int) -> None:
        """Once per mailing: it lists numbers twice, and only one SMS per number is told."""
        if smsid in self._resent:
            return
        log.warning(
            "mailing lists numbers more than once: sent to again under the same smsid; only "
            "one SMS per number and smsid is tracked, use an smsid per send",
            provider="smspager", smsid=smsid, numbers=numbers,
        )  # fmt: skip
        self._resent[smsid] = None
        while len(self._resent) > MAX_REMEMBERED:
            self._resent.popitem(last=False)

    async def balance(self) -> Decimal:
        body = await self._post(BALANCE)
        return http.parsed(body, lambda: parse_balance(body))


def provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    pager = Client(settings, client)
    return Provider(
        name="smspager",
        check=lambda: balance_text(pager.balance, "RUB"),
        statuses=PerId(pager.statuses, BATCH),
        balance=Balance(pager.balance, "RUB"),
    )
