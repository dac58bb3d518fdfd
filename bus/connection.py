"""The process's NATS connections, and what follows them.

The process has two: the main one (publishing, bucket writes, the state mirror's watch, the
projector) and one for the requests that must not wait: reads of the state bucket and the
pollers' leases. Every write to the bucket comes back on the watch, and at a start or a restart
the watch loads every open message (a million, hundreds of megabytes) onto the main connection:
a callback's bucket read there waited behind that load in the server's outbound buffer, seconds
at a restart with 100,000 open messages, long enough to time out, and the callback's event went
out without its tracking data; a leader's lease renewals timed out the same way, and it gave its
lease up. The second connection carries only those requests and their answers. The watch stays
beside the writes: its echoes of them are read in the same pieces as their answers, the cheapest
way (on a connection of its own, callbacks were 6 to 10% slower, their p99 2 to 10 ms longer).

`Connection` knows whether NATS is connected and counts changes (a disconnect, a reconnect), so
that every watch and consumer can re-establish itself the moment NATS is back instead of waiting
for nats-py to notice missed heartbeats. Opening retries until SMSBUS_STARTUP_TIMEOUT, so replicas
started together against a cluster that is still forming wait rather than crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.protocol.parser import PERMISSIONS_ERR, STALE_CONNECTION

from bus.backoff import Backoff
from bus.config import Settings, nats_users_from, redact_url, url_users, without_user
from bus.credentials import Credentials, TlsFiles, UrlUser
from bus.errors import StartupError

log = structlog.get_logger("smsbus.nats")

ATTEMPT_TIMEOUT = 5.0  # one connection attempt
API_TIMEOUT = 5.0  # JetStream API calls
RETRY_WAIT = 0.25  # between nats-py's tries within an attempt


def variable_for(settings: Settings) -> str:
    return "SMSBUS_NATS_URL" if settings.nats_urls else "SMSBUS_EMBEDDED_NATS_PORT"


def unreachable(settings: Settings, reason: str) -> str:
    """The one line for a NATS that cannot be reached: the variable, the URLs without their
    credentials, and why."""
    shown = ", ".join(redact_url(u) for u in settings.effective_nats_urls)
    return f"{variable_for(settings)}: cannot reach NATS at {shown}: {reason}"


NO_JETSTREAM = "no JetStream answered: is JetStream enabled on this NATS server and account?"


def describe(error: BaseException) -> str:
    """A NATS error in words for a one-line message. A JetStream request nobody answers (a
    server without JetStream, an account without it) comes back from nats-py as a
    ServiceUnavailableError with nothing in it but `code=None`; an API error says what the
    server said. nats-py's errors name a server's address, never a URL's credentials."""
    if isinstance(error, nats.js.errors.ServiceUnavailableError) and not error.description:
        return NO_JETSTREAM
    if isinstance(error, nats.js.errors.APIError) and error.description:
        return str(error.description)
    return str(error) or type(error).__name__


# What a connection attempt meets after the server has answered, or while nothing answers:
# the server closes the socket right after its `-ERR 'Authorization Violation'`, so the client
# sees that error or a reset, depending on which it reads first.
_ECHOES = (TimeoutError, ConnectionResetError, BrokenPipeError, nats.errors.StaleConnectionError)


def _cause(errors: list[BaseException]) -> str:
    """Why connecting failed: nats-py keeps retrying a refused connection or refused
    credentials until the attempt times out, so the last error is mostly a timeout or the reset
    that follows a server's refusal; the last thing the server or the network said ("Connection
    refused", "Authorization Violation") says more, and is named when there is one."""
    cause = next((e for e in reversed(errors) if not isinstance(e, _ECHOES)), None)
    if cause is None:
        cause = next((e for e in reversed(errors) if not isinstance(e, TimeoutError)), errors[-1])
    return describe(cause)


def _servers(settings: Settings) -> tuple[list[str], dict[str, Any]]:
    """The servers' URLs for nats-py, and its options that say who smsbus is: a credentials
    file, an NKEY seed, or the user and password (or token) the URLs carry, then given apart
    from them (bus.credentials.UrlUser), when every URL that carries one carries the same (a
    cluster's servers share their users; URLs with different ones are left to nats-py)."""
    urls = list(settings.effective_nats_urls)
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        creds = Credentials(settings.nats_creds)
        options |= {"user_jwt_cb": creds.jwt, "signature_cb": creds.sign}
    elif settings.nats_nkey is not None:
        options["nkeys_seed_str"] = settings.nats_nkey.reveal()
    found = url_users(urls)
    if len(found) == 1:
        path = settings.nats_url_file
        reread = functools.partial(nats_users_from, path) if path is not None else None
        options |= UrlUser(found.pop(), reread).options()
        urls = [without_user(url) for url in urls]
    return urls, options


def _no_tls(server: str, asked: str) -> str:
    return f"the NATS server at {server} does not use TLS, which {asked} asks for"


class _Client(NATS):
    """nats-py's client, with two changes.

    A server's `-ERR` on an established connection sends it to reconnect, as NATS's Go client
    does, where nats-py closes it for good (`_process_err`, marked FIXME there): a user's JWT
    past its expiry ('User Authentication Expired'), a user revoked or no longer in the server's
    configuration ('Authorization Violation'), an account at its connection limit. A closed
    client never connects again: smsbus would have spooled every callback, not ready, until
    restarted. Reconnecting reads the credentials again, and a refusal is logged and retried
    like any other. Stale connections and permission errors keep nats-py's handling; so does an
    error while connecting, which `open` retries.

    TLS asked for (`asked`) is had, or the server is left before smsbus says anything to it.
    nats-py turns to TLS only when the server's INFO says `tls_required`, whatever the URL's
    scheme or the TLS context given: a server that offers TLS without requiring it
    (`allow_non_tls`: `tls_available`) was talked to in the clear, and one without TLS was sent
    the CONNECT, credentials and all, in the clear. The first now gets TLS; the second nothing:
    a StartupError at start, a refusal logged and retried at a reconnection."""

    def __init__(
        self,
        asked: str | None = None,
        variable: str = "SMSBUS_NATS_URL",
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__()
        self._asked = asked
        self._variable = variable
        self._tls = tls
        self.opened = False  # set by `open` once connected: every connection after is a retry

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """nats-py's context for this connection: the TLS files' as they are now."""
        if self._tls is not None:
            self.options["tls"] = self._tls.context()
        return super().ssl_context

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and self._asked and not info.get("tls_required"):
            if not info.get("tls_available"):
                uri = self._current_server.uri if self._current_server else None
                plain = _no_tls(redact_url(uri.geturl()) if uri else "?", self._asked)
                if self.opened:
                    raise nats.errors.Error(plain)  # nats-py's reconnecting retries its errors
                raise StartupError(f"{self._variable}: {plain}")  # leaves nats-py's connect
            info["tls_required"] = True  # the server's INFO, which nats-py keeps and reads next
        await super()._process_info(info, initial_connection)

    async def _process_err(self, err_msg: str) -> None:
        if self.is_connecting or STALE_CONNECTION in err_msg or PERMISSIONS_ERR in err_msg:
            await super()._process_err(err_msg)
            return
        error = nats.errors.Error(f"nats: {err_msg.strip(chr(39))}")  # as nats-py words it
        self._err = error
        await self._error_cb(error)
        await self._process_op_err(error)


def in_the_clear(nc: NATS) -> bool:
    """Whether a connection is not encrypted: a check after the fact, behind `_Client`'s before
    it. nats-py turns to TLS only when the server's INFO (as `_Client` leaves it) says
    `tls_required`, and keeps that INFO in `_server_info` (there is no public accessor); should
    a release drop it, every connection counts as in the clear: TLS asked for is then refused
    with its one line, never assumed."""
    info = getattr(nc, "_server_info", None)
    return not (isinstance(info, dict) and info.get("tls_required"))


class Connection:
    def __init__(self, settings: Settings, name: str = "smsbus") -> None:
        self._settings = settings
        self.name = name  # the client name the server shows, and the logs' `connection`
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.generation = 0  # changes at every disconnect and reconnect
        self._changed = asyncio.Event()
        self._up = asyncio.Event()
        self._closing = False
        # Why reconnecting has failed since the last disconnect (None while connected), and each
        # reason logged so far: nats-py tries every RETRY_WAIT, and each reason is logged once.
        self.last_error: str | None = None
        self._reasons: set[str] = set()

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "Connection.open() first"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "Connection.open() first"
        return self._js

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def change(self) -> asyncio.Event:
        """An event that is set at the next disconnect or reconnect."""
        return self._changed

    async def connected(self) -> None:
        """Return once NATS is connected."""
        await self._up.wait()

    def jetstream(self, timeout: float) -> JetStreamContext:
        return self.nc.jetstream(timeout=timeout)

    async def open(self, deadline: float, **callbacks: Any) -> None:
        """Connect, retrying until `deadline` (monotonic); StartupError naming the variable."""
        shown = ", ".join(redact_url(u) for u in self._settings.effective_nats_urls)
        urls, user = _servers(self._settings)
        tls = TlsFiles(self._settings.nats_tls) if self._settings.nats_tls else None
        asked = self._settings.tls_asked_by
        errors: list[BaseException] = []
        backoff = Backoff(0.2, 2.0)

        async def on_error(exc: Exception) -> None:
            if self._nc is None:  # connecting: kept to say why, should the attempts run out
                errors.append(exc)
                if not errors[:-1] and not self._closing:
                    # nats-py retries within an attempt: say so now, not when it times out.
                    log.info("NATS not reachable yet; retrying", nats=shown,
                             error=_cause(errors), retry_in_s=RETRY_WAIT)  # fmt: skip
                return
            if self._closing:
                return
            if self._nc.is_connected:
                log.warning(
                    "nats error", connection=self.name, error=str(exc) or type(exc).__name__
                )
                return
            # Reconnecting: a server down, credentials refused or revoked, a credentials file
            # broken (bus/credentials.py); said once each, and shown in /readyz.
            self.last_error = describe(exc)
            if self.last_error not in self._reasons:
                self._reasons.add(self.last_error)
                log.warning("nats reconnection failed; retrying", connection=self.name,
                            error=self.last_error)  # fmt: skip

        # nats-py's own types say whole seconds; it takes fractions.
        options: dict[str, Any] = {
            "servers": urls,
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": RETRY_WAIT,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "error_cb": on_error,
            # Every subject is built here from validated parts (the prefix, provider ids,
            # statuses, bucket keys): checking each publish again costs a regular expression
            # per message on the callback's path.
            "skip_subject_validation": True,
            "tls": tls.context() if tls else None,
            **user,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "lame_duck_mode_cb": self._on_lame_duck,
            **callbacks,
        }
        while True:
            attempt = min(ATTEMPT_TIMEOUT, max(0.5, deadline - time.monotonic()))
            try:
                options["connect_timeout"] = min(2.0, attempt)
                client = _Client(asked, variable_for(self._settings), tls)
                try:
                    await asyncio.wait_for(client.connect(**options), attempt)
                except StartupError:  # a server without TLS, told nothing
                    with contextlib.suppress(Exception):
                        await client.close()
                    raise
                client.opened = True
                self._nc = client
                break
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                errors.append(exc)
                reason = _cause(errors)
                if time.monotonic() + backoff.ceiling > deadline:
                    raise StartupError(unreachable(self._settings, reason)) from None
                wait = backoff.failed()
                log.info("NATS not reachable yet; retrying", nats=shown, error=reason,
                         retry_in_s=round(wait, 2))  # fmt: skip
                await asyncio.sleep(wait)
        if asked and in_the_clear(self._nc):
            url = self._nc.connected_url
            await self.close()
            server = redact_url(url.geturl()) if url else shown
            raise StartupError(f"{variable_for(self._settings)}: {_no_tls(server, asked)}")
        self._js = self._nc.jetstream(timeout=API_TIMEOUT)
        self._up.set()

    def _bump(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _on_disconnected(self) -> None:
        self._up.clear()
        self._bump()
        if not self._closing:
            log.warning("nats disconnected", connection=self.name)

    async def _on_lame_duck(self) -> None:
        # The server is stopping gracefully (`nats-server --signal ldm`, a NATS Helm chart's pod
        # stopping): it hands its leaderships over and closes its clients within its lame duck
        # duration; the warnings of that disconnection follow.
        url = self.nc.connected_url
        log.info("nats server stopping (lame duck mode); this connection reconnects once it closes",
                 connection=self.name, url=redact_url(url.geturl()) if url else None)  # fmt: skip

    async def _on_reconnected(self) -> None:
        url = self.nc.connected_url
        shown = redact_url(url.geturl()) if url else None
        log.info("nats reconnected", connection=self.name, url=shown)
        asked = self._settings.tls_asked_by
        if asked and in_the_clear(self.nc):
            log.error("NATS reconnected without TLS", connection=self.name, url=shown,
                      asked_by=asked)  # fmt: skip
        self.last_error = None
        self._reasons.clear()
        self._up.set()
        self._bump()

    async def close(self) -> None:
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await asyncio.wait_for(self._nc.close(), 5.0)
