"""A fake SMSC /sys/get.php (smsc.txt): history and inbound in fmt=3, the md5 password, paging by
prev_id, and its rule: a 4th identical request within a minute is refused with error 9."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass
class FakeSmsc:
    login: str = "smsc-login"
    password: str = "smsc-secret-pw"
    history: list[dict[str, Any]] = field(default_factory=list)  # newest first
    answers: list[dict[str, Any]] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    refused: int = 0
    _identical: dict[str, list[float]] = field(default_factory=dict)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/sys/get.php", self._get, methods=["GET", "POST"])])

    async def _get(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.forms.append(form)
        self.queries.append(request.url.query)
        key = orjson.dumps(form, option=orjson.OPT_SORT_KEYS).decode()
        now = time.monotonic()
        recent = [t for t in self._identical.get(key, []) if now - t < 60] + [now]
        self._identical[key] = recent
        if len(recent) > 3:
            self.refused += 1
            return _json({"error": "duplicate request, wait a minute", "error_code": 9})
        md5 = hashlib.md5(self.password.encode()).hexdigest()
        if (form.get("login"), form.get("psw")) != (self.login, md5):
            return _json({"error": "authorise error", "error_code": 2})
        if form.get("get_messages"):
            rows = self.history
            if "prev_id" in form:
                rows = [r for r in rows if int(r["id"]) < int(form["prev_id"])]
            return _json(rows[: int(form.get("cnt", "100"))])
        if form.get("get_answers"):
            after = int(form.get("after_id", "0"))
            return _json([a for a in self.answers if int(a["id"]) > after])
        return _json({"error": "parameters error", "error_code": 1})


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")
