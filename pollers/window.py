"""A persisted time-window cursor for providers that list inbound SMS by date range.

Each poll asks for [until - OVERLAP, now], so a message the provider lists a little late is still
seen; ids already published inside the overlap are remembered in the cursor, so each message is
published once, ever, whatever the stream's duplicate window.
"""

from __future__ import annotations

from collections.abc import Sized
from datetime import UTC, datetime, timedelta

import orjson

from pollers.types import InboundSms

OVERLAP = timedelta(minutes=5)
FIRST_LOOK_BACK = timedelta(hours=24)


class Window:
    def __init__(self, cursor: str | None, now: datetime) -> None:
        data = orjson.loads(cursor) if cursor else {}
        self.now = now
        until = datetime.fromisoformat(data["until"]) if "until" in data else now - FIRST_LOOK_BACK
        self.start = until - OVERLAP
        self.recent: dict[str, float] = dict(data.get("recent", {}))

    def take(
        self, found: list[InboundSms], unreadable: Sized = ()
    ) -> tuple[list[InboundSms], str | None]:
        """Of what this window's request found, the messages not published before, and the
        cursor to save once they are. When rows were listed and not one could be read (all
        `unreadable`), no cursor: the window stays where it is, so that the SMS in them are
        still listed when a release can read them (a change of the answer's form, or a row
        alone in its window). That is not a failed call, which would back off the provider's
        status polls as well until some readable SMS came; each row is told once (a dead
        letter) however often it is listed again."""
        if unreadable and not found:
            return [], None
        new = [sms for sms in found if sms.message_id not in self.recent]
        for sms in found:
            self.recent[sms.message_id] = (sms.sent_at or self.now).timestamp()
        return new, self.cursor()

    def cursor(self) -> str:
        horizon = (self.now - OVERLAP - OVERLAP).timestamp()
        recent = {k: v for k, v in self.recent.items() if v >= horizon}
        return orjson.dumps(
            {"until": self.now.astimezone(UTC).isoformat(), "recent": recent}
        ).decode()
