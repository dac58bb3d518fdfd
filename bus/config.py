"""Configuration: read once from the environment at start-up, typed, validated.

Nothing else in smsbus reads `os.environ`. A bad value raises `ConfigError`, whose message names
the variable and says what is wrong, without echoing a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bus import credentials
from bus.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A NATS subject token or stream name: no separators, wildcards or white space.
_NATS_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# Tokens travel in a URL path: keep them to unreserved characters.
_TOKEN = re.compile(r"^[A-Za-z0-9._~-]+$")
MIN_TOKEN_LENGTH = 16
_LOG_FORMATS = ("auto", "json", "console")


class Secret:
    """A string that never shows itself in a repr, a log line or an exception. One read from a
    `*_FILE` can be read again (`reload`), for a Secret that was rotated under a running
    process."""

    __slots__ = ("_path", "_value")

    def __init__(self, value: str, path: str | None = None) -> None:
        self._value = value
        self._path = path

    def reveal(self) -> str:
        return self._value

    def reload(self) -> bool:
        """Read the file again; True when the value changed. A file that cannot be read (or is
        empty) keeps the value it had."""
        if self._path is None:
            return False
        try:
            value = Path(self._path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return False
        changed = bool(value) and value != self._value
        if changed:
            self._value = value
        return changed

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# CONTRACT.md section 2: each provider's documented host (scheme, host, port). HTTPS wherever
# the provider's API documentation says its API takes it (SMSTOWER and SMSC: "HTTP/HTTPS";
# SMS-Pager names https URLs; SMSPilot's API is on the same https site as its cabinet), so
# passwords and API keys do not cross the network in clear; ePochta's names only http.
DEFAULT_URLS = {
    "smspilot": "https://smspilot.ru",
    "smstower": "https://clients.smstower.ru",
    "smspager": "https://transport.sms-pager.com:7214",
    "smsc": "https://smsc.com.ua",
    "epochta": "http://my.epochta.ru",
}
# The credential variables that switch a provider's poller on.
CREDENTIALS = {
    "smspilot": ("APIKEY",),
    "smstower": ("LOGIN", "PASSWORD"),
    "smspager": ("LOGIN", "PASSWORD"),
    "smsc": ("LOGIN", "PASSWORD"),
    "epochta": ("USERNAME", "PASSWORD"),
}
SMSC_MIN_INTERVAL = 21  # smsc.txt: no more than 3 identical requests a minute
# nats-server's sync_interval: "always", or a Go duration such as 2m, 30s, 1m30s.
_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    url: str
    tz: ZoneInfo
    interval: float
    max_interval: float
    credentials: tuple[Secret, ...] = ()
    track_ttl: float = 259200.0  # SMSBUS_TRACK_TTL: how far back a status can still change

    @property
    def enabled(self) -> bool:
        return bool(self.credentials)


def _no_passphrase() -> bytes:
    """For a key file: an encrypted key is refused rather than asked for on a terminal."""
    return b""


@dataclass(frozen=True)
class NatsTls:
    """TLS for the connections to SMSBUS_NATS_URL's servers: the CAs their certificates are
    checked against, instead of the system's (so a private CA does not change what the HTTPS
    calls to providers trust), and a client certificate for servers that verify clients."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(self.cert, self.key, password=_no_passphrase)
        return context


@dataclass(frozen=True)
class Settings:
    nats_urls: tuple[str, ...] = field(default=(), repr=False)  # may hold a password
    nats_url_file: Path | None = None  # SMSBUS_NATS_URL_FILE, read again at each reconnection
    nats_tls: NatsTls | None = None  # SMSBUS_NATS_TLS_*: None, the system's CAs
    nats_creds: Path | None = None  # SMSBUS_NATS_CREDS: a user's JWT and NKEY seed
    nats_nkey: Secret | None = None  # SMSBUS_NATS_NKEY: a user's NKEY seed, read at start
    embedded_nats_port: int = 4222
    data_dir: Path = Path(".smsbus")
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    subject_prefix: str = "sms"
    stream: str = "SMS"
    stream_replicas: int = 1
    startup_timeout: float = 60.0
    stream_max_age: float = 2592000.0  # 0: forever
    state_max_age: float = 2592000.0  # 0: forever
    duplicate_window: float = 600.0
    embedded_nats_sync: str = "2m"
    drain_timeout: float = 30.0
    publish_timeout: float = 2.0
    deadletter_rate: int = 60  # a minute, per HTTP peer
    smspilot_callback_tokens: tuple[Secret, ...] = ()
    smspilot_callback_token_file: Path | None = None  # read again as callbacks come
    smspilot_allowed_ips: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_format: str = "auto"
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    smspilot_reconcile_after: float = 120.0
    balance_interval: float = 300.0
    track_ttl: float = 259200.0
    lease_ttl: float = 15.0

    @property
    def tls_asked_by(self) -> str | None:
        """What asks for TLS to NATS (SMSBUS_NATS_TLS_*, a `tls://` URL), or None."""
        if self.nats_tls is not None:
            return "SMSBUS_NATS_TLS_*"
        if any(url.startswith("tls://") for url in self.nats_urls):
            return "a tls:// URL"
        return None

    @property
    def embedded(self) -> bool:
        """True when smsbus runs its own nats-server."""
        return not self.nats_urls

    @property
    def effective_nats_urls(self) -> tuple[str, ...]:
        if self.nats_urls:
            return self.nats_urls
        return (f"nats://127.0.0.1:{self.embedded_nats_port}",)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every SMSBUS_* setting; raise ConfigError on the first bad one."""
    env = _Env(os.environ if environ is None else environ)
    track_ttl = env.seconds("SMSBUS_TRACK_TTL", 259200.0, low=1, high=90 * 86400)
    nats_urls = env.nats_urls("SMSBUS_NATS_URL")
    settings = Settings(
        nats_urls=nats_urls,
        nats_url_file=env.file_path("SMSBUS_NATS_URL"),
        nats_tls=env.nats_tls(embedded=not nats_urls),
        nats_creds=env.nats_creds(embedded=not nats_urls),
        nats_nkey=env.nats_nkey(embedded=not nats_urls),
        embedded_nats_port=env.port("SMSBUS_EMBEDDED_NATS_PORT", 4222),
        data_dir=Path(env.text("SMSBUS_DATA_DIR", ".smsbus")),
        http_host=env.text("SMSBUS_HTTP_HOST", "127.0.0.1"),
        http_port=env.port("SMSBUS_HTTP_PORT", 8080),
        api_host=env.text("SMSBUS_API_HOST", "127.0.0.1"),
        api_port=env.port("SMSBUS_API_PORT", 8081),
        subject_prefix=env.nats_name("SMSBUS_SUBJECT_PREFIX", "sms"),
        stream=env.nats_name("SMSBUS_STREAM", "SMS"),
        stream_replicas=env.integer("SMSBUS_STREAM_REPLICAS", 1, low=1, high=5),
        startup_timeout=env.seconds("SMSBUS_STARTUP_TIMEOUT", 60.0, low=1, high=3600),
        stream_max_age=env.seconds("SMSBUS_STREAM_MAX_AGE", 2592000.0, low=0, high=3650 * 86400),
        state_max_age=env.seconds("SMSBUS_STATE_MAX_AGE", 2592000.0, low=0, high=3650 * 86400),
        duplicate_window=env.seconds("SMSBUS_DUPLICATE_WINDOW", 600.0, low=1, high=86400),
        embedded_nats_sync=env.sync_interval("SMSBUS_EMBEDDED_NATS_SYNC", "2m"),
        drain_timeout=env.seconds("SMSBUS_DRAIN_TIMEOUT", 30.0, low=0, high=86400),
        deadletter_rate=env.integer("SMSBUS_DEADLETTER_RATE", 60, low=0, high=1_000_000),
        publish_timeout=env.seconds("SMSBUS_PUBLISH_TIMEOUT", 2.0, low=0.05, high=60.0),
        smspilot_callback_tokens=env.tokens("SMSBUS_SMSPILOT_CALLBACK_TOKEN"),
        smspilot_callback_token_file=env.file_path("SMSBUS_SMSPILOT_CALLBACK_TOKEN"),
        smspilot_allowed_ips=env.networks("SMSBUS_SMSPILOT_ALLOWED_IPS"),
        trusted_proxies=env.networks("SMSBUS_TRUSTED_PROXIES"),
        log_format=env.choice("SMSBUS_LOG_FORMAT", "auto", _LOG_FORMATS),
        providers={name: _provider(env, name, track_ttl) for name in DEFAULT_URLS},
        smspilot_reconcile_after=env.seconds(
            "SMSBUS_SMSPILOT_RECONCILE_AFTER", 120.0, low=1, high=30 * 86400
        ),
        balance_interval=env.seconds("SMSBUS_BALANCE_INTERVAL", 300.0, low=1, high=86400),
        track_ttl=track_ttl,
        lease_ttl=env.seconds("SMSBUS_LEASE_TTL", 15.0, low=1, high=600),
    )
    _check_windows(settings)
    return settings


def _check_windows(s: Settings) -> None:
    """JetStream refuses a duplicate window longer than the stream's age limit; the two
    listeners must not want the same address."""
    if s.stream_max_age and s.duplicate_window > s.stream_max_age:
        raise ConfigError(
            "SMSBUS_DUPLICATE_WINDOW", "must not be longer than SMSBUS_STREAM_MAX_AGE"
        )
    wildcard = ("0.0.0.0", "::", "")
    same_host = s.api_host == s.http_host or s.api_host in wildcard or s.http_host in wildcard
    if s.api_port == s.http_port and same_host:
        raise ConfigError(
            "SMSBUS_API_PORT",
            f"{s.api_port} is SMSBUS_HTTP_PORT's too: the private API needs a port of its own",
        )
    if not s.embedded:
        return
    for variable, port in (("SMSBUS_HTTP_PORT", s.http_port), ("SMSBUS_API_PORT", s.api_port)):
        if port == s.embedded_nats_port:
            raise ConfigError(variable, f"{port} is SMSBUS_EMBEDDED_NATS_PORT's too")


def _provider(env: _Env, name: str, track_ttl: float) -> ProviderSettings:
    upper = f"SMSBUS_{name.upper()}"
    default_interval = 60.0 if name == "smsc" else 30.0
    interval = env.seconds(f"{upper}_INTERVAL", default_interval, low=0.05, high=86400)
    if name == "smsc" and interval < SMSC_MIN_INTERVAL:
        raise ConfigError(
            f"{upper}_INTERVAL",
            f"must be at least {SMSC_MIN_INTERVAL} s: SMSC refuses a 4th identical request "
            "within a minute",
        )
    max_interval = env.seconds(f"{upper}_MAX_INTERVAL", 600.0, low=0.05, high=7 * 86400)
    if max_interval < interval:
        raise ConfigError(f"{upper}_MAX_INTERVAL", f"must not be below {upper}_INTERVAL")
    variables = [f"{upper}_{part}" for part in CREDENTIALS[name]]
    secrets = tuple(env.secret(variable) for variable in variables)
    files = tuple(env.file_of(variable) for variable in variables)
    if any(secrets) and not all(secrets):
        missing = [
            part for part, value in zip(CREDENTIALS[name], secrets, strict=True) if not value
        ]
        raise ConfigError(f"{upper}_{missing[0]}", "is needed with the other credentials")
    return ProviderSettings(
        name=name,
        url=env.base_url(f"{upper}_URL", DEFAULT_URLS[name]),
        tz=env.zone(f"{upper}_TZ", "Europe/Kyiv" if name == "smsc" else "Europe/Moscow"),
        interval=interval,
        max_interval=max_interval,
        credentials=tuple(Secret(s, f) for s, f in zip(secrets, files, strict=True))
        if all(secrets)
        else (),
        track_ttl=track_ttl,
    )


class _Env:
    """Typed readers over an environment mapping; each names its variable on failure."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str) -> str:
        value = self._environ.get(name, "").strip()
        return value or default

    def secret(self, name: str) -> str:
        """A secret from NAME or from the file named by NAME_FILE (whitespace stripped)."""
        direct = self._environ.get(name, "").strip()
        file_name = f"{name}_FILE"
        path = self._environ.get(file_name, "").strip()
        if direct and path:
            raise ConfigError(name, f"set either {name} or {file_name}, not both")
        if not path:
            return direct
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(file_name, f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(file_name, f"{path} is not UTF-8 text") from None

    def file_of(self, name: str) -> str | None:
        """The file NAME_FILE names, if the secret comes from one."""
        return self._environ.get(f"{name}_FILE", "").strip() or None

    def file_path(self, name: str) -> Path | None:
        """`file_of` as a path: for a secret read again from its file while smsbus runs."""
        file = self.file_of(name)
        return Path(file) if file else None

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(name, f"must be between {low} and {high}, got {value}")
        return value

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, low=1, high=65535)

    def seconds(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self._environ.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, f"expected a number of seconds, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(name, f"must be between {low:g} and {high:g} seconds, got {raw}")
        return value

    def sync_interval(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if value.lower() == "always":
            return "always"
        if not _GO_DURATION.match(value) or not any(c in "123456789" for c in value):
            raise ConfigError(
                name, f"expected always or a duration such as 2m or 30s, got {value!r}"
            )
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def base_url(self, name: str, default: str) -> str:
        value = self.text(name, default).rstrip("/")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not one
        except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535"
            raise ConfigError(name, f"expected scheme, host and port only ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = redact_url(value)
            raise ConfigError(name, f"expected scheme, host and port only, got {shown!r}")
        if parts.path or parts.query or parts.username:
            raise ConfigError(name, "give scheme, host and port only: smsbus appends the paths")
        return value

    def zone(self, name: str, default: str) -> ZoneInfo:
        value = self.text(name, default)
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long
            raise ConfigError(name, f"unknown time zone {value!r}") from None

    def nats_name(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if not _NATS_NAME.match(value):
            raise ConfigError(name, "use letters, digits, '-' and '_' only")
        return value

    def nats_urls(self, name: str) -> tuple[str, ...]:
        """NATS server URLs, from NAME or, as a URL may carry a user and password, from the
        file NAME_FILE names (a Kubernetes Secret's, say)."""
        urls = tuple(u.strip() for u in self.secret(name).split(",") if u.strip())
        shown = f"{name}_FILE" if self.file_of(name) else name
        for url in urls:
            try:
                parts = _split(url)
            except ValueError as exc:  # "Invalid IPv6 URL": not shown, it may hold a password
                raise ConfigError(shown, f"not a NATS server URL ({exc})") from None
            if parts.scheme in ("ws", "wss"):  # nats-py needs aiohttp for them, not installed
                why = "WebSocket URLs are not supported, use nats:// or tls://"
                raise ConfigError(shown, f"{why}: {redact_url(url)!r}")
            if parts.scheme not in ("nats", "tls") or not parts.hostname:
                raise ConfigError(shown, f"not a NATS server URL: {redact_url(url)!r}")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ConfigError(shown, f"bad port in {redact_url(url)!r}") from None
        return urls

    def nats_tls(self, embedded: bool) -> NatsTls | None:
        """SMSBUS_NATS_TLS_CA, _CERT and _KEY (PEM files), tried once here so that a file that
        cannot be read or used stops start-up with one line naming it; `embedded`: no
        SMSBUS_NATS_URL was given, so there is no server to use them with."""
        ca, cert, key = (
            self._environ.get(f"SMSBUS_NATS_TLS_{part}", "").strip() or None
            for part in ("CA", "CERT", "KEY")
        )
        if ca is None and cert is None and key is None:
            return None
        first = "SMSBUS_NATS_TLS_" + ("CA" if ca else "CERT" if cert else "KEY")
        if embedded:
            raise ConfigError(
                first, "is for SMSBUS_NATS_URL's servers; the embedded one has no TLS"
            )
        if (cert is None) != (key is None):
            missing = "SMSBUS_NATS_TLS_KEY" if key is None else "SMSBUS_NATS_TLS_CERT"
            raise ConfigError(missing, "set SMSBUS_NATS_TLS_CERT and SMSBUS_NATS_TLS_KEY together")
        for part, path in (("CA", ca), ("CERT", cert), ("KEY", key)):
            if path is not None:
                try:
                    Path(path).read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"SMSBUS_NATS_TLS_{part}", f"cannot read {path}: {exc.strerror}"
                    ) from None
        tls = NatsTls(*(Path(p) if p else None for p in (ca, cert, key)))
        if ca is not None:
            try:
                NatsTls(ca=tls.ca).context()
            except ssl.SSLError as exc:
                raise ConfigError(
                    "SMSBUS_NATS_TLS_CA", f"no PEM certificate to trust in {ca}: {exc.reason}"
                ) from None
        if cert is not None:
            try:
                tls.context()
            except ssl.SSLError as exc:  # a mismatched pair, an encrypted key, not PEM
                raise ConfigError(
                    "SMSBUS_NATS_TLS_CERT",
                    f"cannot use {cert} with the key in {key}: {exc.reason or exc}",
                ) from None
        return tls

    def _nats_user_file(self, name: str, embedded: bool) -> Path | None:
        path = self._environ.get(name, "").strip()
        if not path:
            return None
        if embedded:
            raise ConfigError(
                name, "is for SMSBUS_NATS_URL's servers; the embedded one has no users"
            )
        return Path(path)

    def nats_creds(self, embedded: bool) -> Path | None:
        """SMSBUS_NATS_CREDS: a NATS credentials file, read once here so that one the server
        would refuse stops start-up with one line (bus/credentials.py)."""
        name = "SMSBUS_NATS_CREDS"
        path = self._nats_user_file(name, embedded)
        if path is None:
            return None
        try:
            credentials.check(path)
        except credentials.BadCredentials as exc:
            raise ConfigError(name, str(exc)) from None
        return path

    def nats_nkey(self, embedded: bool) -> Secret | None:
        """SMSBUS_NATS_NKEY: a file with a user's NKEY seed, read once, here: the user is its
        public key, which the server's configuration names, so a new seed needs a restart."""
        name = "SMSBUS_NATS_NKEY"
        path = self._nats_user_file(name, embedded)
        if path is None:
            return None
        if self._environ.get("SMSBUS_NATS_CREDS", "").strip():
            raise ConfigError(name, "set SMSBUS_NATS_CREDS or SMSBUS_NATS_NKEY, not both")
        try:
            return Secret(credentials.user_seed(path))
        except credentials.BadCredentials as exc:
            raise ConfigError(name, str(exc)) from None

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        networks = []
        for item in self._environ.get(name, "").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(name, f"not an IP address or CIDR block: {item!r}") from None
        return tuple(networks)

    def tokens(self, name: str) -> tuple[Secret, ...]:
        tokens = tuple(t.strip() for t in self.secret(name).split(",") if t.strip())
        for position, token in enumerate(tokens, start=1):
            # Name the token by its position: the value itself is the secret.
            if not _TOKEN.match(token):
                raise ConfigError(
                    name, f"token {position} may hold only letters, digits and . _ ~ -"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(
                    name, f"token {position} is shorter than {MIN_TOKEN_LENGTH} characters"
                )
        return tuple(Secret(t) for t in tokens)


def callback_tokens_from(path: Path) -> tuple[Secret, ...]:
    """SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE's tokens, read again; ConfigError as at start."""
    name = "SMSBUS_SMSPILOT_CALLBACK_TOKEN"
    return _Env({f"{name}_FILE": str(path)}).tokens(name)


def nats_users_from(path: Path) -> set[tuple[str, str | None]]:
    """The users of SMSBUS_NATS_URL_FILE's URLs, read again (bus.credentials.UrlUser);
    ConfigError as at start."""
    return url_users(_Env({"SMSBUS_NATS_URL_FILE": str(path)}).nats_urls("SMSBUS_NATS_URL"))


def _split(url: str) -> SplitResult:
    """A NATS URL in its parts (one without a scheme is nats://); urlsplit's ValueError."""
    return urlsplit(url if "://" in url else f"nats://{url}")


def url_user(url: str) -> tuple[str, str | None] | None:
    """The user and password a NATS URL carries, decoded (`p%40ss` is `p@ss`); a URL with a user
    and no password carries a token; None without either."""
    parts = _split(url)
    if not parts.username and parts.password is None:
        return None
    password = unquote(parts.password) if parts.password is not None else None
    return unquote(parts.username or ""), password


def url_users(urls: Iterable[str]) -> set[tuple[str, str | None]]:
    """The users the URLs carry, each once."""
    return {user for user in map(url_user, urls) if user is not None}


def without_user(url: str) -> str:
    """The URL without its user and password (the host as written, an IPv6 one in brackets)."""
    parts = _split(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def redact_url(url: str) -> str:
    """The URL with any user name or password replaced by ***; one that cannot be read, ***."""
    try:
        parts = _split(url)
    except ValueError:  # "Invalid IPv6 URL": what is in it is not known
        return "***"
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=f"***@{parts.netloc.rpartition('@')[2]}").geturl()
