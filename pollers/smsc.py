"""SMSC (smsc.txt, /sys/get.php): statuses from the account's sent-message history, inbound SMS
after an id. SMSC's document has no balance method here, and nothing needs tracking: the history
lists every message of the account.

Requests are POSTs with `login` and `psw` (the password's lower-case MD5) in the body and
`fmt=3` (JSON). The server refuses a 4th identical history or inbound request within a minute
(error 9): `SMSBUS_SMSC_INTERVAL` of at least 21 s keeps the regular polls under that, and a guard
here holds back any request that would be the 4th identical one. After error 9 we wait 60 s.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import httpx
import orjson

from bus.config import ProviderSettings
from bus.errors import ProviderAuthError, ProviderPayloadError, ProviderUnavailable
from bus.messages import digits
from pollers import http
from pollers.types import InboundSms, StatusReport
from pollers.values import local

PATH = "/sys/get.php"
DATE = "%d.%m.%Y %H:%M:%S"
PAGE = 100  # "cnt … Максимальное значение равно 100"
MAX_PAGES = 50  # per poll: at most 5,000 history rows
LOOK_BACK = timedelta(days=2)  # the history window (`start`) of every poll
RATE_WINDOW = 60.0
RATE_LIMIT = 3
WAIT_AFTER_9 = 60.0

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
    if body.lstrip().startswith(b"ERROR"):  # the plain-text form, should fmt be ignored
        _error({"error_code": digits(body.decode("utf-8", "replace").split("(")[0]) or "?"})
    try:
        return orjson.loads(body)
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


def parse_history(body: bytes, tz: ZoneInfo) -> list[StatusReport]:
    """get_messages' rows; error 3 (nothing found) is an empty history."""
    reports = []
    for row in _rows(body, "history"):
        if not isinstance(row, dict) or row.get("id") is None or row.get("status") is None:
            raise ProviderPayloadError("a history row lacks id or status")
        stamp = row.get("last_timestamp")
        if isinstance(stamp, int | float) and stamp > 0:
            occurred: datetime | None = datetime.fromtimestamp(stamp, UTC)
        else:
            occurred = local(str(row.get("last_date") or ""), DATE, tz)
        err = row.get("err")
        phone = digits(str(row.get("phone") or "")) or None
        reports.append(
            StatusReport(
                message_id=str(row["id"]),
                raw_status=str(row["status"]),
                occurred_at=occurred,
                error_code=str(err) if err not in (None, "", 0, "0") else None,
                error=str(row.get("status_name")) if err not in (None, "", 0, "0") else None,
                phone=phone,
            )
        )
    return reports


def parse_answers(body: bytes, tz: ZoneInfo) -> list[InboundSms]:
    messages = []
    for row in _rows(body, "inbound"):
        if not isinstance(row, dict) or row.get("id") is None:
            raise ProviderPayloadError("an inbound row lacks its id")
        messages.append(
            InboundSms(
                message_id=str(row["id"]),
                sender=str(row.get("phone") or ""),
                recipient=str(row.get("to_phone") or ""),
                text=str(row.get("message") or ""),
                sent_at=local(str(row.get("sent") or row.get("received") or ""), DATE, tz),
            )
        )
    return messages


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


class Client:
    name: ClassVar[str] = "smsc"
    status_batch: ClassVar[int] = 0
    balance_unit: ClassVar[str | None] = None
    has_inbound: ClassVar[bool] = True
    has_history: ClassVar[bool] = True

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = client
        login, password = (s.reveal() for s in settings.credentials)
        self._auth = {"login": login, "psw": hashlib.md5(password.encode()).hexdigest().lower()}
        self._guard = RateGuard()

    async def _get(self, **fields: str) -> bytes:
        await self._guard.admit(fields)
        form = self._auth | fields | {"fmt": "3"}
        return await http.post(self._http, self._settings.url + PATH, form=form)

    async def statuses(self, ids: list[str]) -> list[StatusReport]:
        return []

    async def history(self) -> list[StatusReport]:
        """The last LOOK_BACK of the account's history, newest first, page by page."""
        tz = self._settings.tz
        start = (datetime.now(tz) - LOOK_BACK).strftime("%d.%m.%Y")
        reports: list[StatusReport] = []
        prev_id: str | None = None
        for _ in range(MAX_PAGES):
            fields = {"get_messages": "1", "start": start, "cnt": str(PAGE)}
            if prev_id:
                fields["prev_id"] = prev_id
            body = await self._get(**fields)
            page = http.parsed(body, partial(parse_history, body, tz))
            reports.extend(page)
            if len(page) < PAGE:
                break
            prev_id = page[-1].message_id
        return reports

    async def inbound(self, cursor: str | None) -> tuple[list[InboundSms], str | None]:
        fields = {"get_answers": "1"}
        fields |= {"after_id": cursor} if cursor else {"hour": "24"}
        body = await self._get(**fields)
        found = http.parsed(body, lambda: parse_answers(body, self._settings.tz))
        if not found:
            return [], cursor
        newest = max(
            found, key=lambda sms: int(sms.message_id) if sms.message_id.isdecimal() else 0
        )
        return found, newest.message_id

    async def probe(self) -> str:
        """One cheap authenticated call (SMSC has no balance method): one history row."""
        body = await self._get(get_messages="1", cnt="1")
        http.parsed(body, lambda: parse_history(body, self._settings.tz))
        return "history readable"
