"""A fake SMS-Pager (smspager.txt): XML bodies to /report.xml (general by start/stop, detailed by
smsid) and /balance.xml, credentials inside, codes from "РЕЗУЛЬТАТ ОБРАБОТКИ"."""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HEAD = "<?xml version='1.0' encoding='UTF-8'?>"


@dataclass
class FakeSmspager:
    login: str = "pager-login"
    password: str = "pager-secret-pw"
    # smsid: {group: [numbers]}; the general report names them by a system id of its own
    mailings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    account: str = "1234.5"
    bodies: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/report.xml", self._report, methods=["POST"]),
                Route("/balance.xml", self._balance, methods=["POST"]),
            ]
        )

    def detail_requests(self) -> list[str]:
        return [
            etree.fromstring(body).findtext("smsid") or ""
            for path, body in self.bodies
            if path == "/report.xml" and b"<smsid>" in body
        ]

    def balance_requests(self) -> int:
        return sum(1 for p, _ in self.bodies if p == "/balance.xml")

    def general_requests(self) -> int:
        return sum(1 for p, b in self.bodies if p == "/report.xml" and b"<start>" in b)

    async def _parse(self, request: Request) -> etree._Element | Response:
        body = await request.body()
        self.bodies.append((request.url.path, body))
        try:
            root = etree.fromstring(body, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError:
            return _xml("<data><code>701</code><descr>parser error</descr></data>")
        if (root.findtext("login"), root.findtext("password")) != (self.login, self.password):
            return _xml("<data><code>501</code><descr>Неверная пара логин/пароль</descr></data>")
        return root

    async def _report(self, request: Request) -> Response:
        root = await self._parse(request)
        if isinstance(root, Response):
            return root
        smsid = root.findtext("smsid")
        if smsid is None:
            rows = "".join(
                f"<sms><smsid>sys-{n}</smsid><datetime>2026-11-22 10:00:00</datetime><text>t</text>"
                f"<source>Magazin</source><allCol>{sum(map(len, g.values()))}</allCol>"
                f"<deliveredCol>{len(g.get('delivered', []))}</deliveredCol>"
                f"<notDeliveredCol>{len(g.get('notDelivered', []))}</notDeliveredCol>"
                f"<waitingCol>{len(g.get('waiting', []))}</waitingCol>"
                f"<enqueuedCol>{len(g.get('enqueued', []))}</enqueuedCol><payment>1</payment></sms>"
                for n, g in enumerate(self.mailings.values())
            )
            return _xml(f"<data><code>1</code><descr>OK</descr>{rows}</data>")
        groups = self.mailings.get(smsid, {})
        detail = "".join(
            f"<{group}>" + "".join(f"<number>{n}</number>" for n in numbers) + f"</{group}>"
            for group, numbers in groups.items()
        )
        return _xml(f"<data><code>1</code><descr>OK</descr><detail>{detail}</detail></data>")

    async def _balance(self, request: Request) -> Response:
        root = await self._parse(request)
        if isinstance(root, Response):
            return root
        return _xml(
            f"<data><code>1</code><descr>OK</descr><account>{self.account}</account></data>"
        )


def _xml(body: str) -> Response:
    return Response(HEAD + body, media_type="application/xml; charset=utf-8")
