"""A fake SMSTOWER, built from smstower.txt: the three POST methods, their XML answers and codes.

Tests script statuses and inbound messages, read every request it received, and can make it
misbehave (`mode`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes import hostile

MSK = ZoneInfo("Europe/Moscow")
HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
# What a gateway's web server says, with 200, while its API is down for maintenance.
MAINTENANCE = (
    '<!DOCTYPE html>\n<html lang="ru">\n<head><meta charset="windows-1251">\n'
    "<title>SMSTOWER &mdash; технические работы</title></head>\n"
    "<body><h1>Ведутся технические работы</h1><p>Сервис будет доступен в ближайшее время.</p>"
    "</body>\n</html>\n"
).encode("cp1251")


@dataclass
class Seen:
    path: str
    query: str
    form: dict[str, str]
    at: float


@dataclass
class FakeSmstower:
    login: str = "tower-login"
    password: str = "tower-secret-pw"
    statuses: dict[str, tuple[str, str]] = field(default_factory=dict)  # id: (status, date)
    inbound: list[dict[str, str]] = field(default_factory=list)
    balance: str = "10654"
    # garbage, truncated, xxe, billion, http500, http429, http301, stall, code10, maintenance
    mode: str | None = None
    retry_after: str = "3"  # the Retry-After of an http429 answer (its gateway's rate limit)
    # Ids whose row comes without its deliveryStatus: not the document's form, a row the poller
    # cannot read in an answer that is otherwise well formed.
    unreadable: set[str] = field(default_factory=set)
    stall_s: float = 12.0  # how long a request hangs in the "stall" mode
    # Methods answering code 10 ("Тех. проблема на стороне сервера", listed under each method)
    # while the others work: one method down, not the gateway.
    down: set[str] = field(default_factory=set)
    # A blip of the gateway (a restart behind its balancer): the next `blip` requests answer 503,
    # each held until all of them are in (or `blip_hold_s` has passed), so that they are all in
    # flight when the gateway goes away, as the requests of a busy poller are.
    blip: int = 0
    blip_hold_s: float = 3.0
    blip_ended_at: float | None = None  # when the last 503 of the blip was answered
    requests: list[Seen] = field(default_factory=list)
    _blipped: list[asyncio.Event] = field(default_factory=list)

    def seen(self, path: str) -> list[Seen]:
        return [r for r in list(self.requests) if r.path == path]

    def settings(self, url: str, interval: float = 0.3) -> dict[str, str]:
        """smsbus's SMSTOWER settings for this fake served at `url`: its credentials, and a
        message polled `interval` s after its registration, then at most every 2 x interval."""
        return {
            "SMSBUS_SMSTOWER_URL": url,
            "SMSBUS_SMSTOWER_LOGIN": self.login,
            "SMSBUS_SMSTOWER_PASSWORD": self.password,
            "SMSBUS_SMSTOWER_INTERVAL": str(interval),
            "SMSBUS_SMSTOWER_MAX_INTERVAL": str(2 * interval),
        }

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/getstatus.v2.php", self._status, methods=["POST"]),
                Route("/incomingsms.php", self._inbound, methods=["POST"]),
                Route("/getbalance.php", self._balance, methods=["POST"]),
            ]
        )

    async def _common(self, request: Request) -> tuple[dict[str, str], Response | None]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        loop = asyncio.get_running_loop()
        self.requests.append(Seen(request.url.path, request.url.query, form, loop.time()))
        if self.mode == "stall":
            await asyncio.sleep(self.stall_s)
        if self.blip:
            return form, await self._blip()
        if self.mode == "http500":
            return form, Response("oops", status_code=500)
        if self.mode == "http301":  # the API moved to another host
            return form, Response(
                "<html>Moved</html>", status_code=301,
                headers={"Location": "https://api.smstower.example" + request.url.path},
            )  # fmt: skip
        if self.mode == "maintenance":  # the gateway's web server, its API down behind it
            return form, Response(MAINTENANCE, media_type="text/html; charset=windows-1251")
        if self.mode == "http429":
            too_many = Response("Too Many Requests", status_code=429)
            too_many.headers["Retry-After"] = self.retry_after
            return form, too_many
        hostile_body = {
            "garbage": hostile.GARBAGE,
            "truncated": hostile.TRUNCATED,
            "xxe": hostile.XXE,
            "billion": hostile.BILLION_LAUGHS,
        }.get(self.mode or "")
        if hostile_body is not None:
            return form, Response(hostile_body, media_type="application/xml")
        if self.mode == "code10" or request.url.path in self.down:
            return form, xml("<response><code>10</code></response>")
        if (form.get("login"), form.get("password")) != (self.login, self.password):
            return form, xml("<response><code>4</code></response>")
        return form, None

    async def _blip(self) -> Response:
        arrived = asyncio.Event()
        self._blipped.append(arrived)
        if len(self._blipped) < self.blip:
            try:
                await asyncio.wait_for(arrived.wait(), self.blip_hold_s)
            except TimeoutError:
                pass
        # The gateway is back: what was in flight gets its 503, what comes next an answer.
        self.blip = 0
        self.blip_ended_at = asyncio.get_running_loop().time()
        for waiting in self._blipped:
            waiting.set()
        self._blipped.clear()
        return Response("Service Unavailable", status_code=503)

    async def _status(self, request: Request) -> Response:
        form, early = await self._common(request)
        if early:
            return early
        ids = [i for i in form.get("messageid", "").split(",") if i]
        if not ids:
            return xml("<response><code>2</code></response>")
        if not all(i.isdigit() for i in ids):
            return xml("<response><code>3</code></response>")
        if len(ids) > 100:
            return xml("<response><code>8</code></response>")
        known = [i for i in ids if i in self.statuses]
        if not known:
            return xml("<response><code>9</code></response>")
        rows = "".join(
            f"<message><dateFinalStatus>{self.statuses[i][1]}</dateFinalStatus>"
            + (
                ""
                if i in self.unreadable
                else f"<deliveryStatus>{self.statuses[i][0]}</deliveryStatus>"
            )
            + f"<idMessage>{i}</idMessage></message>"
            for i in known
        )
        return xml(f"<response><code>1</code><messageList>{rows}</messageList></response>")

    async def _inbound(self, request: Request) -> Response:
        form, early = await self._common(request)
        if early:
            return early
        try:  # smstower.txt, incomingsms.php: 8 for the start date, 9 for the end date
            start = datetime.strptime(form["startDate"], "%Y-%m-%d %H:%M:%S")
        except (KeyError, ValueError):
            return xml("<response><code>8</code></response>")
        try:
            end = datetime.strptime(form["endDate"], "%Y-%m-%d %H:%M:%S")
        except (KeyError, ValueError):
            return xml("<response><code>9</code></response>")
        rows = "".join(
            f"<message><sourceAddress>{m['from']}</sourceAddress>"
            f"<destinationAddress>{m['to']}</destinationAddress><smsText>{m['text']}</smsText>"
            f"<createdDate>{m['created']}</createdDate><idMessage>{m['id']}</idMessage></message>"
            for m in self.inbound
            if start <= datetime.strptime(m["created"], "%Y-%m-%d %H:%M:%S") <= end
        )
        return xml(f"<response><code>1</code><messageList>{rows}</messageList></response>")

    async def _balance(self, request: Request) -> Response:
        form, early = await self._common(request)
        if early:
            return early
        return xml(f"<response><code>1</code><balance>{self.balance}</balance></response>")


def xml(body: str) -> Response:
    return Response(HEAD + body, media_type="application/xml; charset=utf-8")


def msk_now(offset_s: float = 0) -> str:
    from datetime import timedelta

    return (datetime.now(MSK) + timedelta(seconds=offset_s)).strftime("%Y-%m-%d %H:%M:%S")
