"""Serving the apps with uvicorn (httptools, uvloop) on sockets we bind ourselves.

Binding first turns "port in use" into one clear line. `X-Forwarded-For` handling is ours
(receiver.peers), so uvicorn's proxy-header rewriting is off: by default it would believe the
header from 127.0.0.1 and let a local client pick its own address.

uvicorn writes a response's head and its body with a system call each, so a callback's `OK` went
out as two TCP segments, each a write for us and a read for the caller. `Protocol` sends them with
one: the head waits in the connection's transport for the body written right after it.

uvicorn also waits for ever for a request that is slow to arrive: a connection that sends nothing,
or a request that brings a byte now and then, holds its socket until the client lets go, and
enough of them (a few thousand, from one peer) take every descriptor the process has. `Protocol`
gives each request REQUEST_WITHIN from its first byte (or from the connection's start) to its
last, then answers `408` (or, for a connection that sent nothing, just closes it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bus.config import Settings
from bus.errors import StartupError
from receiver.http import ASGIApp

log = structlog.get_logger("smsbus.http")

# A request, head and body, arrives whole within this of its first byte; SMSPilot wants its `OK`
# within 10 s of sending, so a callback that takes longer to arrive is of no use to it either.
REQUEST_WITHIN = 10.0
TOO_SLOW = b"request not received whole within %d s" % REQUEST_WITHIN
_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TOO_SLOW), TOO_SLOW)
)


def bind(host: str, port: int, prefix: str = "SMSBUS_HTTP") -> socket.socket:
    """A listening socket; one line naming `<prefix>_HOST` or `<prefix>_PORT` if it cannot be."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(f"{prefix}_HOST: cannot resolve {host!r}: {exc.strerror}") from None
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise StartupError(
            f"{prefix}_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None


class _HeadWithBody:
    """A connection's transport that holds a response's head until the next write (its body)
    or the end of the response (a HEAD request's answer has no body), and writes the two
    together; everything else passes straight through. Only the first write of a response can
    be its head, so a later part of a body is never held; nor is an interim `100 Continue`,
    which the client waits for before it sends the body."""

    __slots__ = ("_transport", "_head", "_next_is_head")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._next_is_head = True

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif self._next_is_head and data.startswith(b"HTTP/1.1 "):
            if not data.startswith(b"HTTP/1.1 1"):  # a final status: the body comes next
                self._next_is_head = False
                self._head = data
                return
        self._transport.write(data)

    def end_of_response(self) -> None:
        self._flush()
        self._next_is_head = True

    def _flush(self) -> None:
        if self._head is not None:
            data, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._flush()  # a response written whole (uvicorn's own 400) before the close
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing each response's head and body with one write, and
    closing a connection whose request does not arrive whole within REQUEST_WITHIN."""

    listener = "public"
    too_slow: Callable[[], None] = staticmethod(lambda: None)  # counts each one closed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadWithBody(transport)  # type: ignore[assignment]
        self._began = False  # a byte of the request under way has arrived
        self._head = False  # ... and its head, so the app has it
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began, self._head = True, False
        if self._deadline is None:  # the next request on a connection kept alive
            self._arm()

    def on_headers_complete(self) -> None:
        self._head = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._began = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.transport.end_of_response()  # type: ignore[attr-defined]
        super().on_response_complete()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(REQUEST_WITHIN, self._request_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _request_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.pipeline:  # its head is in, and uvicorn reads on once the answer before it is out
            self._arm()
            return
        began = self._began
        # A request begun gets a 408, unless the app, which has its head, began an answer.
        if began and not (self._head and self.cycle.response_started):
            self.transport.write(_408)
        self.transport.close()
        self.too_slow()
        peer = self.client[0] if self.client else None
        log.warning("request not received whole in time; connection closed",
                    listener=self.listener, peer=peer, began=began,
                    seconds=REQUEST_WITHIN)  # fmt: skip


def make_server(
    app: ASGIApp,
    settings: Settings,
    *,
    listener: str = "public",
    too_slow: Callable[[], None] = lambda: None,
) -> uvicorn.Server:
    """A server of `app` on our Protocol; `too_slow` is called for each connection closed because
    its request did not arrive whole in time."""
    protocol = type(
        "Protocol", (Protocol,), {"listener": listener, "too_slow": staticmethod(too_slow)}
    )
    config = uvicorn.Config(
        app,
        http=protocol,
        loop="none",  # the caller runs uvloop
        lifespan="off",  # resources live in bus.core.open_bus, opened before serving
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.publish_timeout) + 5,
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)
