"""How smsbus proves to NATS who it is: a credentials file (SMSBUS_NATS_CREDS), a user's JWT and
the NKEY seed that is theirs; a user's NKEY seed alone (SMSBUS_NATS_NKEY); the user and password,
or token, of SMSBUS_NATS_URL's URLs (`UrlUser`); a client certificate (`TlsFiles`).

`nsc`, the NATS account tools and Synadia Cloud hand a user such a file; NATS servers run in
operator mode (accounts defined by JWTs) expect one:

    -----BEGIN NATS USER JWT-----
    eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOi...
    ------END NATS USER JWT------
    (a warning in words)
    -----BEGIN USER NKEY SEED-----
    SUAM...
    ------END USER NKEY SEED------

The server sends a nonce; the client answers with the JWT and the nonce signed with the seed's
key. nats-py could read the file itself, but it does so line by line: a file without the JWT's
line makes it loop forever inside the event loop, one without the seed's fails with a TypeError
that ends its reconnecting for good, and with Windows line ends it sends keys with a `\\r` on
them. So the file is read here, with the pattern NATS's Go tools use, once at start
(`check`: a bad file stops start-up with one line) and again at each connection and reconnection
(`Credentials`), so that a rotated Secret is taken without a restart; a file that is broken by
then fails that attempt with `BadCredentials`, a nats-py error, which nats-py reports and
retries. Nothing here ever puts the seed, or the JWT, in a message.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
import structlog

from bus.errors import ConfigError

if TYPE_CHECKING:  # bus.config reads credentials files with this module at start
    from bus.config import NatsTls

log = structlog.get_logger("smsbus.nats")

# A key between two dashed lines, as in the Go client's `userConfigRE`: the first is the JWT,
# the seed the first that is a seed.
_FRAMED = re.compile(r"\s*(?:(?:-{3,}.*-{3,}\r?\n)([\w\-.=]+)(?:\r?\n-{3,}.*-{3,}(?:\r?\n|\Z)))")


class BadCredentials(nats.errors.Error):
    """The credentials file cannot be used; the message names the file and why, no key."""


@dataclass(frozen=True)
class _Parsed:
    jwt: str
    seed: bytes
    user: str  # the JWT's subject, the user's public key
    expires: float | None


def _claims(jwt: str) -> dict[str, object]:
    parts = jwt.split(".")
    if len(parts) != 3:
        raise ValueError
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    claims = orjson.loads(base64.urlsafe_b64decode(payload))
    if not isinstance(claims, dict):
        raise ValueError
    return claims


def _parse(path: Path) -> _Parsed:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise BadCredentials(f"cannot read {path}: {exc.strerror}") from None
    framed = _FRAMED.findall(text)
    if not framed:
        raise BadCredentials(f"no user JWT in {path}: not a NATS credentials file")
    jwt = framed[0]
    try:
        claims = _claims(jwt)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise BadCredentials(f"the JWT in {path} cannot be read") from None
    user, kind = claims.get("sub"), claims.get("nats")
    if not isinstance(user, str) or (isinstance(kind, dict) and kind.get("type") != "user"):
        raise BadCredentials(f"the JWT in {path} is not a user's")
    seed = next((key for key in framed[1:] if key.startswith("S")), None)
    if seed is None:
        raise BadCredentials(f"no NKEY seed in {path}")
    expires = claims.get("exp")
    return _Parsed(jwt, seed.encode(), user, expires if isinstance(expires, int) else None)


def _nkeys() -> Any:
    """nkeys (and PyNaCl), imported only where NATS credentials are used: 20 ms and 2 MB."""
    import nkeys  # type: ignore[import-untyped]

    return nkeys


def _key_pair(parsed: _Parsed, path: Path) -> Any:
    nkeys = _nkeys()
    try:
        key_pair = nkeys.from_seed(bytearray(parsed.seed))
    except (nkeys.NkeysError, ValueError):  # PyNaCl's for a seed of another length
        raise BadCredentials(f"the NKEY seed in {path} is not a valid seed") from None
    if key_pair.public_key.decode() != parsed.user:
        key_pair.wipe()
        raise BadCredentials(f"the NKEY seed in {path} is not the key of the JWT's user")
    return key_pair


def check(path: Path) -> None:
    """Raise BadCredentials for a file a NATS server would refuse, before any server is asked:
    unreadable, no JWT or no seed, a seed that is not the JWT's user's, a JWT past its expiry."""
    parsed = _parse(path)
    _key_pair(parsed, path).wipe()
    if parsed.expires is not None and parsed.expires <= time.time():
        when = datetime.fromtimestamp(parsed.expires, UTC).isoformat(timespec="seconds")
        raise BadCredentials(f"the user JWT in {path} expired at {when}")


def user_seed(path: Path) -> str:
    """The user's NKEY seed in `path` (SMSBUS_NATS_NKEY: the seed alone, as `nk -gen user`
    writes it), for a NATS that knows its users by their NKEYs (`users = [{nkey: U...}]`)."""
    try:
        seed = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError as exc:
        raise BadCredentials(f"cannot read {path}: {exc.strerror}") from None
    nkeys = _nkeys()
    try:
        key_pair = nkeys.from_seed(bytearray(seed.encode()))
    except (nkeys.NkeysError, ValueError):  # PyNaCl's for a seed of another length
        raise BadCredentials(f"no NKEY seed in {path}") from None
    try:
        if not key_pair.public_key.startswith(b"U"):
            raise BadCredentials(f"the NKEY seed in {path} is not a user's (SU...)")
    finally:
        key_pair.wipe()
    return seed


@dataclass(frozen=True)
class Credentials:
    """nats-py's `user_jwt_cb` and `signature_cb` over a credentials file, read afresh at each
    connection: nats-py signs the server's nonce first, then asks for the JWT."""

    path: Path

    def jwt(self) -> bytes:
        return _parse(self.path).jwt.encode()

    def sign(self, nonce: str) -> bytes:
        parsed = _parse(self.path)
        key_pair = _key_pair(parsed, self.path)
        try:
            return base64.b64encode(key_pair.sign(nonce.encode()))
        finally:
            key_pair.wipe()


class UrlUser:
    """The user and password (or token) of SMSBUS_NATS_URL's URLs, given to nats-py apart from
    the URLs. nats-py would send them as the URL writes them, so a password with `@`, `/` or
    `:` in it, which a URL must write as `%40`, `%2F`, `%3A`, was refused; here they are decoded.
    From SMSBUS_NATS_URL_FILE they are read again at each connection and reconnection
    (`reread` gives the users of the file's URLs), so a password rotated in a Kubernetes Secret
    and in the servers' configuration is used from the next reconnection; a file that cannot be
    read then, or holds no user, leaves the last ones in use."""

    def __init__(
        self,
        found: tuple[str, str | None],
        reread: Callable[[], set[tuple[str, str | None]]] | None,
    ) -> None:
        self._user, self._password = found
        self._reread = reread
        self._problem: str | None = None  # why the file could not be read again, logged once

    def options(self) -> dict[str, Callable[[], str]]:
        """nats-py's `user` and `password`, or `token`: callables, asked at each CONNECT."""
        if self._password is None:
            return {"token": self._fresh_user}
        return {"user": self._fresh_user, "password": self._current_password}

    def _fresh_user(self) -> str:
        if self._reread is None:
            return self._user
        try:
            found = self._reread()
        except ConfigError as exc:  # the message names the file, never a password
            return self._keep(str(exc))
        if len(found) != 1:
            return self._keep(f"SMSBUS_NATS_URL_FILE: {'no' if not found else 'not one'} user")
        user, password = found.pop()
        if (password is None) != (self._password is None):
            return self._keep("SMSBUS_NATS_URL_FILE: a token where there was a password, or "
                              "the other way round; that takes a restart")  # fmt: skip
        self._user, self._password, self._problem = user, password, None
        return self._user

    def _keep(self, problem: str) -> str:
        """The user and password read before, with why the file's are not used (said once)."""
        if problem != self._problem:
            self._problem = problem
            log.warning("NATS credentials not read again; the last ones stay", error=problem)
        return self._user

    def _current_password(self) -> str:
        """Asked right after the user, whose reading of the file it shares."""
        return self._password or ""


class TlsFiles:
    """The TLS context of the connections to NATS (SMSBUS_NATS_TLS_*), made again when its files
    change: cert-manager renews a client certificate (or the CA that checks the servers') in
    the Secret under a running process, and nats-py would present the one read at start at
    every reconnection, refused once it expired, for as long as smsbus runs. Asked at each
    connection and reconnection; files that cannot be used then (a key that does not match its
    certificate, a file half written) leave the last context in use, said once."""

    def __init__(self, tls: NatsTls) -> None:
        self._tls = tls
        self._read = self._contents()
        self._context = tls.context()
        self._problem: str | None = None

    def _contents(self) -> tuple[bytes, ...]:
        files = (self._tls.ca, self._tls.cert, self._tls.key)
        return tuple(path.read_bytes() if path is not None else b"" for path in files)

    def context(self) -> ssl.SSLContext:
        try:
            contents = self._contents()
            if contents != self._read:
                self._context, self._read, self._problem = self._tls.context(), contents, None
                log.info("NATS TLS files read again; the next connections use them")
        except (OSError, ssl.SSLError, ValueError) as exc:  # the message names no key
            problem = f"SMSBUS_NATS_TLS_*: {exc}"
            if problem != self._problem:
                self._problem = problem
                log.warning("NATS TLS files not read again; the last ones stay", error=problem)
        return self._context
