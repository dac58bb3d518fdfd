"""Requests whose replies we read ourselves: JetStream publishes (their acks) and state reads.

nats-py's `publish_async` turns a JetStream error reply (such as 10158, "duplicate message id is
in process") into an exception inside its reply handler, so the waiting future never learns of it
and times out; and its request path decodes every reply with the standard library. Here one
wildcard inbox of our own carries every reply, a future per request resolves with the reply
itself, and the two readers below decode it with orjson:
- `ack`: a publish's acknowledgement (stream sequence, duplicate flag) or `ReplyError` with the
  JetStream `err_code` intact (and "no responders" when no stream takes the subject);
- `stored`: a `STREAM.MSG.GET` answer (the stream leader's copy) as (data, sequence), or None.
A request with many replies (a batched direct get, the answers to a fast batch's messages) has its
token routed to a function of its own (`route`), which reads each reply as it arrives.
Nothing here times out by itself: the caller bounds the wait.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from bus import wire

NOT_FOUND = 10037  # JSNoMessageFoundErr
WRONG_LAST = (10071, 10164)  # JSStreamWrongLastSequenceErrF, ...ConstantErr


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    duplicate: bool


class ReplyError(nats.errors.Error):
    """JetStream refused a request (or nothing answers its subject)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{code}/{err_code}: {description}")
        self.code = code
        self.err_code = err_code
        self.description = description


class Replies:
    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = f"{nc._inbox_prefix.decode()}.{NUID().next().decode()}."
        self._nuid = NUID()
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._routes: dict[str, Callable[[Msg], None]] = {}
        self._sub: Subscription | None = None

    @property
    def prefix(self) -> str:
        """Reply subjects of ours start with this; the next token routes the reply."""
        return self._prefix

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ">", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Msg]:
        """Send one message with a reply subject of ours; the future resolves with the reply."""
        token = self._nuid.next().decode()
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        future.add_done_callback(lambda _: self._pending.pop(token, None))
        await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        return future

    def route(self, token: str, handle: Callable[[Msg], None]) -> None:
        """Every reply whose subject has this token goes to `handle`, until `unroute`."""
        self._routes[token] = handle

    def unroute(self, token: str) -> None:
        self._routes.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._prefix) :].split(".", 1)[0]
        future = self._pending.get(token)
        if future is not None:
            if not future.done():
                future.set_result(msg)
            return
        handle = self._routes.get(token)
        if handle is not None:
            handle(msg)


def time_out(future: asyncio.Future[Any], what: str = "no answer in time") -> None:
    """For `call_later`: fail a wait for a reply that has not come (TimeoutError)."""
    if not future.done():  # a reply's future leaves the pending replies as it completes
        future.set_exception(TimeoutError(what))


def _no_responders(msg: Msg) -> bool:
    return bool(msg.headers and msg.headers.get("Status") == "503")


def _error(reply: dict[str, object]) -> ReplyError | None:
    error = reply.get("error")
    if not isinstance(error, dict):
        return None
    return ReplyError(
        int(error.get("code", 0)), int(error.get("err_code", 0)), str(error.get("description", ""))
    )


def ack(msg: Msg) -> Ack:
    """A publish's acknowledgement; ReplyError when JetStream refused it."""
    if _no_responders(msg):
        raise ReplyError(503, 0, "no stream takes this subject")
    try:
        reply = orjson.loads(msg.data)
        error = _error(reply)
        if error is None:
            return Ack(int(reply["seq"]), bool(reply.get("duplicate", False)))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise ReplyError(0, 0, "unreadable acknowledgement") from None
    raise error


def stored(msg: Msg) -> tuple[bytes, int] | None:
    """A STREAM.MSG.GET answer: the message's data and sequence, or None when there is none.
    A key-value delete or purge marker reads as no data at the marker's sequence (a write
    after it must name that sequence)."""
    if _no_responders(msg):
        raise ReplyError(503, 0, "no stream answers")
    try:
        reply = orjson.loads(msg.data)
        error = _error(reply)
        if error is not None:
            if error.err_code == NOT_FOUND:
                return None
            raise error
        message = reply["message"]
        headers = base64.b64decode(message.get("hdrs") or "")
        if wire.raw_removes_key(headers):
            return b"", int(message["seq"])
        return base64.b64decode(message.get("data") or ""), int(message["seq"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReplyError(0, 0, f"unreadable message: {type(exc).__name__}") from None
