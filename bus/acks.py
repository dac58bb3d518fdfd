"""JetStream publishes whose acknowledgements we read ourselves.

nats-py's `publish_async` turns a JetStream error reply (such as 10158, "duplicate message id is
in process") into an exception inside its reply handler, so the waiting future never learns of it
and times out instead. Here every publish carries a reply subject under one wildcard inbox of our
own; an ack resolves its future with the stream sequence and the duplicate flag, an error reply
with `AckError` (its `err_code` intact), and "no responders" (no stream takes the subject) with
`AckError` too. Replies are decoded with orjson.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    duplicate: bool


class AckError(nats.errors.Error):
    """JetStream refused a publish (or no stream takes its subject)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class Acks:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = f"{nc._inbox_prefix.decode()}.{NUID().next().decode()}."
        self._nuid = NUID()
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        self._sub: Subscription | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Ack]:
        """Send one message; the future resolves with its ack or AckError (never times out by
        itself: the caller bounds the wait and then calls `forget`)."""
        token = self._nuid.next().decode()
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        future.add_done_callback(lambda _: self._pending.pop(token, None))
        await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        return future

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            future.set_exception(AckError(503, 0, "no stream takes this subject"))
            return
        try:
            reply = orjson.loads(msg.data)
            error = reply.get("error")
            if error is not None:
                future.set_exception(
                    AckError(
                        int(error.get("code", 0)),
                        int(error.get("err_code", 0)),
                        str(error.get("description", "")),
                    )
                )
            else:
                future.set_result(Ack(int(reply["seq"]), bool(reply.get("duplicate", False))))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            future.set_exception(AckError(0, 0, "unreadable acknowledgement"))
