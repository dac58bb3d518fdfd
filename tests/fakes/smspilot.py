"""A fake SMSPilot api2.php, built from smspilot.txt: JSON requests with `apikey` inside."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MSK = ZoneInfo("Europe/Moscow")


@dataclass
class FakeSmspilot:
    apikey: str = "PILOT-API-KEY-0123456789"
    statuses: dict[str, tuple[str, str]] = field(
        default_factory=dict
    )  # server_id: status, modified
    inbound: list[dict[str, str]] = field(default_factory=list)
    balance: str = "405.60"
    requests: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)  # server_id: {"error": code}

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/api2.php", self._api, methods=["POST"])])

    async def _api(self, request: Request) -> Response:
        data = orjson.loads(await request.body())
        self.requests.append(data)
        if data.get("apikey") != self.apikey:
            return _error(400, "User not found")
        if "check" in data:
            ids = [row["server_id"] for row in data["check"]]
            # The table's 302 names no id: the strict reading is that one unknown id in a
            # check is enough for the whole check to be answered with it.
            if any(i not in self.statuses for i in ids):
                return _error(302, "SMS server_id not found")
            rows = [
                {"id": "0", "server_id": i, "status": self.statuses[i][0],
                 "modified": self.statuses[i][1], **self.errors.get(i, {})}
                for i in ids
            ]  # fmt: skip
            return _json({"check": rows})
        if "inbound" in data:
            since = datetime.strptime(data["since"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            rows = [
                m for m in self.inbound
                if datetime.strptime(m["created"], "%Y-%m-%d %H:%M").replace(tzinfo=MSK) >= since
            ]  # fmt: skip
            return _json({"inbound": rows})
        if "balance" in data:
            return Response(f'{{"balance": {self.balance}}}', media_type="application/json")
        return _error(240, "Invalid INPUT list")


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")


def _error(code: int, description: str) -> Response:
    return _json({"error": {"code": str(code), "description": description}})
