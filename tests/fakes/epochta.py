"""A fake ePochta, built from epochta.txt: one POST endpoint taking an `XML` form field."""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class FakeEpochta:
    username: str = "epochta-user"
    password: str = "epochta-secret-pw"
    statuses: dict[str, tuple[str, str, str]] = field(
        default_factory=dict
    )  # id: status, sent, done
    credits: str = "512.5"
    documents: list[bytes] = field(default_factory=list)
    # The document gives its answers no XML declaration and no charset: a server on
    # windows-1251 (Russian PHP's default) answers in it, the sender's Cyrillic ids too.
    charset: str = "utf-8"

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/members/sms/xml.php", self._xml, methods=["POST"])])

    async def _xml(self, request: Request) -> Response:
        document = str((await request.form()).get("XML", "")).encode()
        self.documents.append(document)
        try:
            root = etree.fromstring(document, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError:
            return self._response("-2")
        auth = (root.findtext("authentication/username"), root.findtext("authentication/password"))
        if auth != (self.username, self.password):
            return self._response("-1")
        operation = root.findtext("operations/operation")
        if operation == "BALANCE":
            return self._response("0", f"<credits>{self.credits}</credits>")
        if operation == "GETSTATUS":
            asked = [m.text or "" for m in root.findall("statistics/messageid")]
            rows = "".join(
                f'<message id={quoteattr(i)} sentdate="{self.statuses[i][1]}" '
                f'donedate="{self.statuses[i][2]}" status="{self.statuses[i][0]}"/>'
                for i in asked
                if i in self.statuses
            )
            return self._xml_answer(f"<deliveryreport>{rows}</deliveryreport>")
        return self._response("-2")

    def _response(self, status: str, extra: str = "") -> Response:
        return self._xml_answer(f"<RESPONSE><status>{status}</status>{extra}</RESPONSE>")

    def _xml_answer(self, document: str) -> Response:
        return Response(document.encode(self.charset), media_type="text/xml")
