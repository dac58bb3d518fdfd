"""Small ASGI helpers shared by the routes: plain answers and a bounded body reader."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# CONTRACT.md section 3: request bodies over 64 KiB get 413.
BODY_LIMIT = 64 * 1024
# POST /v1/messages (private): 1000 registrations of the largest size allowed (bus.shapes), each
# value escaped as JSON may be, fit.
REGISTRATION_BODY_LIMIT = 2 * 1024 * 1024
# uvicorn with httptools sets no limit on headers; a callback needs a handful.
HEADER_LIMIT = 16 * 1024
MAX_HEADERS = 100


def headers_too_large(scope: Scope) -> bool:
    headers = scope["headers"]
    return len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > HEADER_LIMIT


class BodyTooLarge(Exception):
    """The body passed BODY_LIMIT; `head` holds what was read, for the dead-letter record."""

    def __init__(self, head: bytes = b"") -> None:
        super().__init__(f"request body exceeds {BODY_LIMIT} bytes")
        self.head = head


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def declared_length(scope: Scope) -> int | None:
    raw = header(scope, b"content-length")
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return None
    return int(raw)


async def read_body(scope: Scope, receive: Receive, limit: int = BODY_LIMIT) -> bytes:
    """The whole request body, refusing more than `limit` bytes."""
    length = declared_length(scope)
    if length is not None and length > limit:
        raise BodyTooLarge()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            raise BodyTooLarge(b"".join(chunks)[:limit])
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_text(
    send: Send, status: int, text: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LimitBody:
    """Starlette middleware: a body over BODY_LIMIT bytes is answered 413; `larger` names the
    (method, path) pairs with a limit of their own."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = BODY_LIMIT,
        larger: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.larger.get((scope["method"], scope["path"]), self.limit)
        length = declared_length(scope)
        if length is not None and length > limit:
            return await send_text(send, 413, f"request body exceeds {limit} bytes")
        size = 0

        async def counted_receive() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                # Raised inside the route, so Starlette's exception middleware answers it.
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counted_receive, send)
