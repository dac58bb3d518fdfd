"""`smsbus serve`: the bus, the pollers and the HTTP receiver in one process.

Start-up opens the bus (bus.core.open_bus), starts the pollers' supervised tasks and serves HTTP;
SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests finish, stops the pollers
and closes the bus, whose last step is to drain the spool for up to SMSBUS_DRAIN_TIMEOUT. A second
signal while it drains gives up the drain: the spool keeps its events for the next start. SIGHUP
(the terminal of `make run` closed) stops it the same way, unless it was started ignoring SIGHUP
(`nohup`): then it goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import signal
from collections.abc import Callable
from types import FrameType

import structlog
import uvicorn

from bus.config import Settings
from bus.core import open_bus
from bus.logs import leave_closed_terminal
from pollers.runner import start_pollers
from receiver.app import create_apps
from receiver.server import bind, make_server

log = structlog.get_logger("smsbus")


class _Stop:
    """What SIGTERM, SIGINT and SIGHUP do: while serving, ask uvicorn to stop; while starting
    (start-up waits up to SMSBUS_STARTUP_TIMEOUT for NATS) or once the bus is closing (draining
    the spool), cancel the main task, which stops the start or gives up the drain."""

    def __init__(self) -> None:
        self.requested = False
        self.draining = False
        self.servers: list[uvicorn.Server] = []
        self._main = asyncio.current_task()
        self._loop = asyncio.get_running_loop()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        # A handler runs between two bytecodes of whatever the main thread was doing, perhaps
        # a log line half written: it only changes flags, and hands its log line and the rest
        # to the event loop, which runs them in the order the signals came.
        if self._loop.is_closed():  # `serve` has returned: the process is on its way out
            return
        later = self._loop.call_soon_threadsafe
        if signum == signal.SIGHUP:
            # The terminal has closed (or someone sent SIGHUP): the stop goes on without it. A
            # shell that closes sends its jobs SIGHUP again, and the kernel the foreground group:
            # no request to give the drain up.
            later(leave_closed_terminal)
            if self.requested:
                return
        # uvicorn installs its own handlers while serving and re-raises what it caught into
        # these before `serve` returns, so those arrive here while `draining` is still False.
        if self.draining or (self.requested and not self.servers):
            later(self._end, log.warning, "second stop signal: leaving without draining the spool")
            return
        self.requested = True
        if not self.servers:
            later(self._end, log.info, "stop signal while starting: stopping")
            return
        for server in self.servers:
            server.should_exit = True
        said = "stop signal: finishing the requests in flight, then stopping"
        later(functools.partial(log.info, said, signal=signal.Signals(signum).name))

    def _end(self, say: Callable[[str], object], event: str) -> None:
        """Stop the start, or give the drain up: cancel the main task."""
        say(event)
        if self._main is not None:
            self._main.cancel()


def settle_heap() -> None:
    """Leave what start-up built (modules, the app, the bus: about 60,000 objects) out of every
    later garbage collection. A full collection walks every object the collector tracks, and it
    runs a few times a second under load, each time stopping the event loop: measured at full
    poll pace, 20 to 25 ms a time before this and 5 to 7 ms after. They live as long as the
    process; one that does not is still freed by its reference count, as almost all are."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings, *, receive: bool = True, poll: bool = True) -> int:
    """Run until SIGTERM or Ctrl-C; then finish in-flight requests, flush the spool, exit 0."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # not under `nohup`
        signal.signal(signal.SIGHUP, stop)
    s = settings
    sockets = [bind(s.http_host, s.http_port, "SMSBUS_HTTP")]
    try:
        sockets.append(bind(s.api_host, s.api_port, "SMSBUS_API"))
        async with open_bus(settings) as bus, contextlib.AsyncExitStack() as stack:
            if poll:
                await start_pollers(bus, stack)
            apps = create_apps(bus, receive=receive)
            settle_heap()
            too_slow = bus.metrics.requests_too_slow
            servers = [
                make_server(
                    apps.public, s, listener="public", too_slow=too_slow.labels("public").inc
                ),
                make_server(
                    apps.private, s, listener="private", too_slow=too_slow.labels("private").inc
                ),
            ]
            stop.servers = servers
            if not stop.requested:
                log.info(
                    "serving",
                    url=f"http://{s.http_host}:{s.http_port}",
                    api=f"http://{s.api_host}:{s.api_port}",
                    callback_route="/callbacks/smspilot"
                    + ("/<token>" if s.smspilot_callback_tokens else ""),
                )
                await asyncio.gather(
                    *(
                        server.serve(sockets=[sock])
                        for server, sock in zip(servers, sockets, strict=True)
                    )
                )
            stop.draining = True
    except asyncio.CancelledError:
        if not stop.requested:
            raise
    finally:
        for sock in sockets:
            sock.close()
    log.info("stopped")
    return 0
