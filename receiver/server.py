"""Serving the apps with uvicorn (httptools, uvloop) on sockets we bind ourselves.

Binding first turns "port in use" into one clear line. `X-Forwarded-For` handling is ours
(receiver.peers), so uvicorn's proxy-header rewriting is off: by default it would believe the
header from 127.0.0.1 and let a local client pick its own address.
"""

from __future__ import annotations

import socket

import uvicorn

from bus.config import Settings
from bus.errors import StartupError
from receiver.http import ASGIApp


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


def make_server(app: ASGIApp, settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        http="httptools",
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
