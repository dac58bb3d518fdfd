"""SMSC (smsc.txt, /sys/get.php): statuses from the account's sent-message history, inbound SMS
after an id. SMSC's document has no balance method here, and nothing needs tracking: the history
lists every message of the account.

Requests are POSTs with `login` and `psw` (the password's lower-case MD5) in the body, `fmt=3`
(JSON) and `charset=utf-8`; an answer that is not valid UTF-8 anyway is read as windows-1251,
SMSC's default. The server refuses a 4th identical history or inbound request within a minute
(error 9): `SMSBUS_SMSC_INTERVAL` of at least 21 s keeps the regular polls under that, and a guard
here holds back any request that would be the 4th identical one. After error 9 we wait 60 s.

History, read so that no status change of a message sent within SMSBUS_TRACK_TTL is missed:
- the history has a row per phone, and one `id` can name a send to several numbers: a row's
  status belongs to the id and the phone;
- `start` is the first day of the TTL window; rows come newest first, `cnt` at most 100 a page,
  and `prev_id` ("the global id the server assigns") asks for the rows before a given one: the
  row's own global id (`int_id`) when the answer carries it, else its `id`;
- every poll reads the newest RECENT_PAGES pages, and goes on with a sweep of the older pages
  where the last poll left it, as many pages as finish one sweep of the whole window within
  SMSBUS_SMSC_MAX_INTERVAL (from the size of the last sweep, MAX_SWEEP before one has ended);
  each sweep page has its own
  `prev_id`, so no request repeats within a minute;
- a page that fails ends the poll, which fails as any does, once the pages read before it are
  published: the sweep goes on from that page at the next poll.
Inbound: `get_answers` with `hour=168` (the document's most) beside `after_id`, so that an outage
longer than the current day loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import httpx
import orjson

from bus.config import ProviderSettings
from bus.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderPayloadError,
    ProviderRowError,
    ProviderUnavailable,
)
from bus.messages import digits
from pollers import http
from pollers.types import HistoryRead, InboundRead, InboundSms, Provider, StatusReport
from pollers.values import local, utf8_or_windows_1251

PATH = "/sys/get.php"
DATE = "%d.%m.%Y %H:%M:%S"
PAGE = 100  # "cnt … Максимальное значение равно 100"
RECENT_PAGES = 3  # read from the top every poll
MAX_SWEEP = 300  # sweep pages a poll, at most (30,000 rows); also before the size is known
RATE_WINDOW = 60.0
RATE_LIMIT = 3
WAIT_AFTER_9 = 60.0
INBOUND_HOURS = "168"  # "Максимальное количество часов - 168 (7 дней)"

ERRORS = {
    "1": "error in the parameters",
    "2": "wrong login or password",
    "3": "message not found",
    "4": "IP address temporarily blocked",
    "9": "more than three identical requests within a minute",
}


def _error(data: Any) -> None:
    """Raise for any error shape an fmt=3 answer can take."""
    code = None
    if isinstance(data, dict) and "error_code" in data:
        code = str(data["error_code"])
    elif isinstance(data, dict) and "error" in data:
        code = "?"
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "error_code" in data[0]:
        code = str(data[0]["error_code"])
    if code is None:
        return
    meaning = ERRORS.get(code, "undocumented error")
    if code == "2":
        raise ProviderAuthError(f"error 2: {meaning}")
    if code == "9":
        raise ProviderUnavailable(f"error 9: {meaning}", retry_after=WAIT_AFTER_9)
    if code == "4":
        raise ProviderUnavailable(f"error 4: {meaning}", retry_after=10 * WAIT_AFTER_9)
    raise ProviderPayloadError(f"error {code}: {meaning}")


def _json(body: bytes) -> Any:
    text = utf8_or_windows_1251(body)  # UTF-8 as asked for, else SMSC's default
    if text.lstrip().startswith("ERROR"):  # the plain-text form, should fmt be ignored
        _error({"error_code": digits(text.split("(")[0]) or "?"})
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProviderPayloadError("answer is not JSON") from None


def _rows(body: bytes, what: str) -> list[Any]:
    """An fmt=3 list answer; error 3 ("not found") is an empty list."""
    data = _json(body)
    if isinstance(data, dict) and str(data.get("error_code")) == "3":
        return []
    _error(data)
    if not isinstance(data, list):
        raise ProviderPayloadError(f"{what} answer is not a list")
    return data


class Page(NamedTuple):
    """One page of get_messages."""

    reports: list[StatusReport]  # a report per row read (its id and phone)
    last: str | None  # the global id of the page's last row, for the next page's `prev_id`
    rows: int  # rows on the page, read or not: fewer than PAGE is the window's end
    unreadable: list[ProviderRowError]  # rows that could not be read, each with its JSON


def parse_page(body: bytes, tz: ZoneInfo) -> Page:
    """One page of get_messages. A row that cannot be read is set aside (the history lists
    every message of the account, so failing the page would stop every status behind it until
    the row leaves the window), also when no row of the page can be (the last page of a sweep
    may hold that one row alone). What a poll none of whose rows can be read means is the
    engine's (`ProviderPoller._history`)."""
    rows = _rows(body, "history")
    reading = partial(_history_row, tz=tz)
    reports, unreadable = http.each(reading, rows, orjson.dumps)
    last = None
    for row in reversed(rows):
        if isinstance(row, dict) and (found := row.get("int_id") or row.get("id")) is not None:
            last = str(found)
            break
    return Page(reports, last, len(rows), unreadable)


def _history_row(row: Any, tz: ZoneInfo) -> StatusReport:
    if not isinstance(row, dict) or row.get("id") is None or row.get("status") is None:
        raise ProviderPayloadError("a history row lacks id or status")
    stamp = row.get("last_timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool) and stamp > 0:
        try:
            occurred: datetime | None = datetime.fromtimestamp(stamp, UTC)
        except (OverflowError, OSError, ValueError):
            raise ProviderPayloadError("a history row's last_timestamp is out of range") from None
    else:
        occurred = local(str(row.get("last_date") or ""), DATE, tz)
    err = row.get("err")
    failed = err not in (None, "", 0, "0")
    return StatusReport(
        message_id=str(row["id"]),
        raw_status=str(row["status"]),
        occurred_at=occurred,
        error_code=str(err) if failed else None,
        error=str(row.get("status_name")) if failed else None,
        phone=digits(str(row.get("phone") or "")) or None,
    )


def parse_history(body: bytes, tz: ZoneInfo) -> list[StatusReport]:
    """The reports of one page read alone (a probe): none read of the rows it lists fails."""
    page = parse_page(body, tz)
    http.none_read(page.reports, page.unreadable)
    return page.reports


def parse_answers(body: bytes, tz: ZoneInfo) -> tuple[list[InboundSms], list[ProviderRowError]]:
    """The inbound SMS listed, and the rows that could not be read (set aside). get_answers has
    no error 3 ("not found", get_messages's empty history), and how it says that there is no SMS
    is not written: `[]`, or nothing at all, as fmt=0's list of no lines would be. Both are no
    SMS; the cursor stays, so nothing is lost should an answer be blank by mistake, where a
    failed call would back off the history's polls with it on every quiet account."""
    if not body or body.isspace():
        return [], []
    return http.each(partial(_answer_row, tz=tz), _rows(body, "inbound"), orjson.dumps)


def _answer_row(row: Any, tz: ZoneInfo) -> InboundSms:
    if not isinstance(row, dict) or row.get("id") is None:
        raise ProviderPayloadError("an inbound row lacks its id")
    return InboundSms(
        message_id=str(row["id"]),
        sender=str(row.get("phone") or ""),
        recipient=str(row.get("to_phone") or ""),
        text=str(row.get("message") or ""),
        sent_at=local(str(row.get("sent") or row.get("received") or ""), DATE, tz),
    )


class RateGuard:
    """Never a 4th identical request inside any rolling minute."""

    def __init__(self) -> None:
        self._sent: dict[bytes, deque[float]] = {}

    async def admit(self, fields: dict[str, str]) -> None:
        key = hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).digest()
        times = self._sent.setdefault(key, deque())
        now = time.monotonic()
        while times and now - times[0] >= RATE_WINDOW:
            times.popleft()
        if len(times) >= RATE_LIMIT:
            await asyncio.sleep(RATE_WINDOW - (now - times[0]) + 0.1)
            times.popleft()
        times.append(time.monotonic())
        if len(self._sent) > 10_000:  # sweep pages are all different: forget the old ones
            self._sent = {k: v for k, v in self._sent.items() if v and now - v[-1] < RATE_WINDOW}


class Client:
    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client
        self._guard = RateGuard()
        self._sweep_from: str | None = None  # prev_id where the sweep goes on; None: start over
        self._sweep_pages = 0  # pages of the sweep under way
        self._last_sweep = 0  # pages the last whole sweep took (0: not known yet)

    @property
    def _auth(self) -> dict[str, str]:
        login, password = (s.reveal() for s in self._settings.credentials)
        return {"login": login, "psw": hashlib.md5(password.encode()).hexdigest().lower()}

    async def _get(self, **fields: str) -> bytes:
        fields = fields | {"fmt": "3", "charset": "utf-8"}
        await self._guard.admit(fields)
        return await http.post(self._http, self._settings.url + PATH, form=self._auth | fields)

    def sweep_budget(self) -> int:
        """Sweep pages this poll: enough to go once over the whole window (as big as the last
        sweep found it) within SMSBUS_SMSC_MAX_INTERVAL, one interval kept in hand for the time
        the pages take. Until a sweep has ended (after a start) the most, so that the first one
        is over soon."""
        if not self._last_sweep:
            return MAX_SWEEP
        s = self._settings
        polls = max(1.0, s.max_interval / s.interval - 1)
        return max(1, min(MAX_SWEEP, math.ceil(self._last_sweep / polls) + 1))

    async def _page(self, start: str, prev_id: str | None) -> Page:
        fields = {"get_messages": "1", "start": start, "cnt": str(PAGE)}
        if prev_id:
            fields["prev_id"] = prev_id
        body = await self._get(**fields)
        return http.parsed(body, lambda: parse_page(body, self._settings.tz))

    async def history(self) -> HistoryRead:
        """The newest pages, then the next stretch of the sweep over the rest of the window;
        the rows that could not be read; and the failure of a page, if one failed: the pages
        before it are kept (the sweep goes on from the failing page at the next poll, so pages
        given up would be read again only a whole sweep later)."""
        pages: list[Page] = []
        try:
            await self._pages(pages)
        except ProviderError as exc:
            return *self._read(pages), exc
        return *self._read(pages), None

    async def _pages(self, pages: list[Page]) -> None:
        """history's pages, added to `pages` as they are read."""
        tz = self._settings.tz
        start = (datetime.now(tz) - timedelta(seconds=self._settings.track_ttl)).strftime(
            "%d.%m.%Y"
        )
        prev_id: str | None = None
        for _ in range(RECENT_PAGES):
            pages.append(page := await self._page(start, prev_id))
            prev_id = page.last
            if page.rows < PAGE:
                return  # the whole window fits in the newest pages
        if self._sweep_from is None:
            self._sweep_from, self._sweep_pages = prev_id, RECENT_PAGES
        for _ in range(self.sweep_budget()):
            pages.append(page := await self._page(start, self._sweep_from))
            self._sweep_pages += 1
            if page.rows < PAGE or page.last is None:
                self._last_sweep, self._sweep_from = self._sweep_pages, None
                break
            self._sweep_from = page.last

    @staticmethod
    def _read(pages: list[Page]) -> tuple[list[StatusReport], list[ProviderRowError]]:
        reports = [report for page in pages for report in page.reports]
        return reports, [row for page in pages for row in page.unreadable]

    async def inbound(self, cursor: str | None) -> InboundRead:
        fields = {"get_answers": "1", "hour": INBOUND_HOURS}
        if cursor:
            fields["after_id"] = cursor
        body = await self._get(**fields)
        found, unreadable = http.parsed(body, lambda: parse_answers(body, self._settings.tz))
        if not found:
            return [], cursor, unreadable
        numeric = [int(sms.message_id) for sms in found if sms.message_id.isdecimal()]
        newest = str(max(numeric)) if numeric else cursor
        if cursor and cursor.isdecimal():
            found = [
                s for s in found if not s.message_id.isdecimal() or int(s.message_id) > int(cursor)
            ]
        return found, newest, unreadable

    async def probe(self) -> str:
        """One cheap authenticated call (SMSC has no balance method): one history row."""
        body = await self._get(get_messages="1", cnt="1")
        http.parsed(body, lambda: parse_history(body, self._settings.tz))
        return "history readable"


def provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    smsc = Client(settings, client)
    return Provider(name="smsc", check=smsc.probe, history=smsc.history, inbound=smsc.inbound)
