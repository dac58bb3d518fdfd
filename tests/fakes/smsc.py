"""A fake SMSC /sys/get.php, built from smsc.txt and read strictly: history and inbound in fmt=3,
the md5 password, and all the document allows:
- an answer in windows-1251 unless the request asks for `charset=utf-8` (SMSC's default);
- a send to several numbers is one `id` with a row per phone;
- rows newest first, `cnt` at most 100; `prev_id` is "the global id the server assigns": rows
  before the one with that global id (`int_id`, which rows carry; message ids are not ordered
  like it); `start`/`end` by the date of sending, in Kyiv;
- `get_answers` after an id (excluding it), within `hour` hours, else "the current day";
- the rule: a 4th identical request within a minute is refused with error 9."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

KYIV = ZoneInfo("Europe/Kyiv")


@dataclass
class FakeSmsc:
    login: str = "smsc-login"
    password: str = "smsc-secret-pw"
    history: list[dict[str, Any]] = field(default_factory=list)  # newest first
    answers: list[dict[str, Any]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    refused: int = 0
    global_ids: bool = True  # rows carry `int_id`; False: an answer without it (ids are global)
    honours_charset: bool = True  # False: windows-1251 whatever the request asks
    # How get_answers says there is no SMS is not written (it has no error 3): `[]`, or with
    # this, nothing at all, as its fmt=0 list of no lines.
    blank_when_no_answers: bool = False
    _identical: dict[str, list[float]] = field(default_factory=dict)
    _next_int: itertools.count[int] = field(default_factory=lambda: itertools.count(900_000))
    _keys: list[int] = field(default_factory=list)  # -global id of each history row, ascending
    times: list[float] = field(default_factory=list)  # when each request came (monotonic)
    # History pages (by their `prev_id`) that answer 503 as many times as given: a server behind
    # a balancer failing now and then under a long sweep.
    failing_pages: dict[str, int] = field(default_factory=dict)

    def send(
        self,
        message_id: int,
        phones: list[str],
        status: int = 0,
        sent: datetime | None = None,
        status_name: str = "Передано оператору",
        sort: bool = True,
    ) -> None:
        """One send (one id) to several numbers: a row per phone, newest first (`sort=False`
        for many at once, then `sort()`)."""
        sent = sent or datetime.now(KYIV)
        for phone in phones:
            row = {
                "status": status, "last_date": sent.strftime("%d.%m.%Y %H:%M:%S"),
                "last_timestamp": int(sent.timestamp()), "err": 0,
                "send_date": sent.strftime("%d.%m.%Y %H:%M:%S"),
                "send_timestamp": int(sent.timestamp()), "phone": phone, "cost": "0.5",
                "sender_id": "SMSC", "status_name": status_name, "message": "Привіт",
                "country": "Україна", "operator": "Kyivstar", "region": "", "id": message_id,
                "int_id": next(self._next_int),
            }  # fmt: skip
            self.history.append(row)
        if sort:
            self.sort()

    def sort(self) -> None:
        """Newest first, by the global id."""
        self.history.sort(key=lambda r: -int(r.get("int_id", r["id"])))
        self._keys = [-int(r.get("int_id", r["id"])) for r in self.history]

    def change(self, message_id: int, phone: str, status: int, **fields: Any) -> None:
        now = datetime.now(KYIV)
        for row in self.history:
            if row["id"] == message_id and row["phone"] == phone:
                row.update(status=status, last_date=now.strftime("%d.%m.%Y %H:%M:%S"),
                           last_timestamp=int(now.timestamp()), **fields)  # fmt: skip

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/sys/get.php", self._get, methods=["GET", "POST"])])

    def pages(self) -> list[dict[str, str]]:
        return [f for f in self.forms if f.get("get_messages")]

    async def _get(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.forms.append(form)
        self.queries.append(request.url.query)
        self.times.append(time.monotonic())
        utf8 = self.honours_charset and form.get("charset", "").lower() == "utf-8"
        key = orjson.dumps(form, option=orjson.OPT_SORT_KEYS).decode()
        now = time.monotonic()
        recent = [t for t in self._identical.get(key, []) if now - t < 60] + [now]
        self._identical[key] = recent
        if len(recent) > 3:
            self.refused += 1
            return _json({"error": "duplicate request, wait a minute", "error_code": 9}, utf8)
        md5 = hashlib.md5(self.password.encode()).hexdigest()
        if (form.get("login"), form.get("psw")) != (self.login, md5):
            return _json({"error": "authorise error", "error_code": 2}, utf8)
        if form.get("get_messages"):
            if self.failing_pages.get(form.get("prev_id", ""), 0) > 0:
                self.failing_pages[form["prev_id"]] -= 1
                return Response("Service Unavailable", status_code=503)
            return _json(self._messages(form), utf8)
        if form.get("get_answers"):
            after = int(form.get("after_id", "0"))
            hours = int(form["hour"]) if "hour" in form else None
            since = (
                datetime.now(KYIV) - timedelta(hours=hours)
                if hours
                else datetime.now(KYIV).replace(hour=0, minute=0, second=0, microsecond=0)
            )
            rows = [
                a for a in self.answers
                if int(a["id"]) > after
                and datetime.strptime(a["received"], "%d.%m.%Y %H:%M:%S").replace(tzinfo=KYIV)
                >= since
            ]  # fmt: skip
            if not rows and self.blank_when_no_answers:
                return Response(b"", media_type="application/json")
            return _json(rows, utf8)
        return _json({"error": "parameters error", "error_code": 1}, utf8)

    def _messages(self, form: dict[str, str]) -> Any:
        rows = self.history
        if "prev_id" in form:
            before = int(form["prev_id"])
            if self.global_ids and len(self._keys) == len(self.history):
                rows = rows[bisect.bisect_right(self._keys, -before) :]  # a big history, fast
            else:
                field_ = "int_id" if self.global_ids else "id"
                rows = [r for r in rows if int(r.get(field_, r["id"])) < before]
        count = min(100, int(form.get("cnt", "100")))
        if "start" in form:  # rows are newest first: the ones sent before `start` come last
            start = datetime.strptime(form["start"], "%d.%m.%Y").replace(tzinfo=KYIV).timestamp()
            page = list(itertools.islice((r for r in rows if r["send_timestamp"] >= start), count))
        else:
            page = rows[:count]
        if not page:
            return {"error": "messages not found", "error_code": 3}
        if not self.global_ids:
            page = [{k: v for k, v in r.items() if k != "int_id"} for r in page]
        return page


def _json(data: Any, utf8: bool) -> Response:
    text = orjson.dumps(data).decode()
    if utf8:
        return Response(text.encode(), media_type="application/json; charset=utf-8")
    return Response(text.encode("cp1251", errors="replace"), media_type="application/json")
