"""Serve a fake provider (an ASGI app) with uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from starlette.requests import ClientDisconnect

from tests.support import free_port, wait_for


class Served:
    """`tls`: a certificate and its key, to serve HTTPS."""

    def __init__(self, app: Any, tls: tuple[Path, Path] | None = None) -> None:
        self.port = free_port()
        self._scheme = "https" if tls else "http"
        certificate, key = (str(tls[0]), str(tls[1])) if tls else (None, None)
        config = uvicorn.Config(
            _ignore_gone_clients(app), host="127.0.0.1", port=self.port, log_level="warning",
            lifespan="off", access_log=False, ssl_certfile=certificate, ssl_keyfile=key,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> Served:
        self._thread.start()
        wait_for(lambda: self.server.started, what="the fake provider to start")
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.server.should_exit = True
        self._thread.join(10)


def _ignore_gone_clients(app: Any) -> Any:
    """A client that hung up mid-request (a replica killed by a test) gets no answer, and no
    traceback on the test's output."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except ClientDisconnect:
            pass

    return wrapped
