from __future__ import annotations

import base64
import ipaddress
import re
import time
from pathlib import Path

import nats.errors
import nkeys  # type: ignore[import-untyped]
import pytest

from bus.config import Secret, Settings, load_settings, redact_url, url_user, without_user
from bus.credentials import Credentials
from bus.errors import ConfigError
from tests.accounts import Operator, key_pair


def test_defaults_follow_the_contract() -> None:
    s = load_settings({})
    assert (
        (),
        4222,
        Path(".smsbus"),
        "127.0.0.1",
        8080,
        "sms",
        "SMS",
        1,
        2.0,
        (),
        "auto",
    ) == (
        s.nats_urls,
        s.embedded_nats_port,
        s.data_dir,
        s.http_host,
        s.http_port,
        s.subject_prefix,
        s.stream,
        s.stream_replicas,
        s.publish_timeout,
        s.smspilot_callback_tokens,
        s.log_format,
    )
    assert s.embedded
    assert ("nats://127.0.0.1:4222",) == s.effective_nats_urls


def test_lists_are_split_on_commas() -> None:
    s = load_settings(
        {
            "SMSBUS_NATS_URL": "nats://a:4222, nats://b:4222",
            "SMSBUS_SMSPILOT_ALLOWED_IPS": "10.0.0.0/8, 2001:db8::/32",
            "SMSBUS_SMSPILOT_CALLBACK_TOKEN": "aaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbb",
        }
    )
    assert ("nats://a:4222", "nats://b:4222") == s.nats_urls
    assert not s.embedded
    assert (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    ) == s.smspilot_allowed_ips
    assert ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"] == [
        t.reveal() for t in s.smspilot_callback_tokens
    ]


def test_secret_from_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  cccccccccccccccc\n")
    s = load_settings({"SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE": str(path)})
    assert ["cccccccccccccccc"] == [t.reveal() for t in s.smspilot_callback_tokens]


def test_secret_and_its_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set either SMSBUS_SMSPILOT_CALLBACK_TOKEN or"):
        load_settings(
            {
                "SMSBUS_SMSPILOT_CALLBACK_TOKEN": "dddddddddddddddd",
                "SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE": str(tmp_path / "t"),
            }
        )


def test_secrets_never_show_in_repr_or_errors() -> None:
    token = "eeeeeeeeeeeeeeee"
    s = load_settings(
        {"SMSBUS_SMSPILOT_CALLBACK_TOKEN": token, "SMSBUS_NATS_URL": "nats://u:nats-pw@h:4222"}
    )
    assert token not in repr(s) and "nats-pw" not in repr(s)
    assert token not in str(Secret(token))
    with pytest.raises(ConfigError) as info:
        load_settings({"SMSBUS_SMSPILOT_CALLBACK_TOKEN": "tok en with spaces, and more"})
    assert "tok en" not in str(info.value)
    assert isinstance(s, Settings)


def test_url_credentials_are_redacted() -> None:
    assert "nats://***@host:4222" == redact_url("nats://user:pw@host:4222")
    assert "nats://host:4222" == redact_url("nats://host:4222")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMSBUS_NATS_TLS_CA": "{ca}"},
         "SMSBUS_NATS_TLS_CA: is for SMSBUS_NATS_URL's servers; the embedded one has no TLS"),
        ({"SMSBUS_NATS_URL": "tls://h:4222", "SMSBUS_NATS_TLS_CERT": "{ca}"},
         "SMSBUS_NATS_TLS_KEY: set SMSBUS_NATS_TLS_CERT and SMSBUS_NATS_TLS_KEY together"),
        ({"SMSBUS_NATS_URL": "tls://h:4222", "SMSBUS_NATS_TLS_CA": "/nonexistent/ca.pem"},
         "SMSBUS_NATS_TLS_CA: cannot read /nonexistent/ca.pem: No such file or directory"),
        ({"SMSBUS_NATS_URL": "tls://h:4222", "SMSBUS_NATS_TLS_CA": "{ca}"},
         "SMSBUS_NATS_TLS_CA: no PEM certificate to trust in {ca}"),
    ],
)  # fmt: skip
def test_nats_tls_files_are_checked_at_start(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """Each mistake in SMSBUS_NATS_TLS_* is one ConfigError naming the variable (the files are
    made and used in tests/test_startup.py, against a real nats-server)."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        load_settings({k: v.format(ca=ca) for k, v in env.items()})
    assert str(info.value).startswith(message.format(ca=ca)), str(info.value)


def _creds_files(where: Path) -> dict[str, tuple[Path, str]]:
    """Credentials files of one account's users: good, and each way one can be wrong; with the
    seed each holds, which no message may show."""
    operator = Operator()
    good, seed = operator.user(where / "good.creds", "good")
    other, other_seed = operator.user(where / "other.creds", "other")
    mixed = where / "mixed.creds"  # one user's JWT, another's seed
    mixed.write_text(good.read_text().replace(seed, other_seed))
    jwt_only = where / "jwt-only.creds"
    jwt_only.write_text(good.read_text().split("-----BEGIN USER NKEY SEED")[0])
    long_seed = where / "long-seed.creds"  # one key too many in the seed: PyNaCl refuses it
    long_seed.write_text(good.read_text().replace(seed, seed + "AAAAAAAA"))
    pem = where / "cert.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return {
        "good": (good, seed),
        "mixed": (mixed, other_seed),
        "jwt-only": (jwt_only, seed),
        "long-seed": (long_seed, seed),
        "pem": (pem, ""),
        "expired": operator.user(where / "expired.creds", "old", expires=time.time() - 60),
        "crlf": operator.user(where / "crlf.creds", "windows", newline="\r\n"),
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMSBUS_NATS_CREDS": "good"},
         "SMSBUS_NATS_CREDS: is for SMSBUS_NATS_URL's servers; the embedded one has no users"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "/nonexistent/u.creds"},
         "SMSBUS_NATS_CREDS: cannot read /nonexistent/u.creds: No such file or directory"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "pem"},
         "SMSBUS_NATS_CREDS: the JWT in {pem} cannot be read"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "mixed"},
         "SMSBUS_NATS_CREDS: the NKEY seed in {mixed} is not the key of the JWT's user"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "jwt-only"},
         "SMSBUS_NATS_CREDS: no NKEY seed in {jwt-only}"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "long-seed"},
         "SMSBUS_NATS_CREDS: the NKEY seed in {long-seed} is not a valid seed"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": "expired"},
         "SMSBUS_NATS_CREDS: the user JWT in {expired} expired at 20"),
    ],
)  # fmt: skip
def test_a_nats_credentials_file_is_checked_at_start(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """SMSBUS_NATS_CREDS names a file the NATS servers would refuse: one ConfigError naming the
    variable and saying why, never the seed (used against a real server in test_startup.py)."""
    files = _creds_files(tmp_path)
    named = {k: str(files[v][0]) if v in files else v for k, v in env.items()}
    with pytest.raises(ConfigError) as info:
        load_settings(named)
    paths = {name: str(path) for name, (path, _) in files.items()}
    assert str(info.value).startswith(message.format_map(paths)), str(info.value)
    assert [] == [name for name, (_, seed) in files.items() if seed and seed in str(info.value)]


def test_a_credentials_file_is_read_afresh_for_each_connection(tmp_path: Path) -> None:
    """What nats-py is given to answer a server's nonce: the JWT and the nonce signed with the
    seed's key, read from the file each time (a rotated Secret is taken at the next
    reconnection), from a file with Windows line ends too; a file broken meanwhile fails that
    attempt with a nats-py error, which nats-py reports and retries."""
    files = _creds_files(tmp_path)
    path = files["crlf"][0]
    settings = load_settings({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_CREDS": str(path)})
    assert path == settings.nats_creds
    creds = Credentials(path)
    for name in ("crlf", "good"):
        source, seed = files[name]
        path.write_bytes(source.read_bytes())
        signature = base64.b64decode(creds.sign("a-nonce"))
        assert nkeys.from_seed(bytearray(seed.encode())).verify(b"a-nonce", signature)
        user_jwt = creds.jwt().decode()
        assert "\r" not in user_jwt and user_jwt in source.read_text()
    path.write_text("rotated by hand, badly\n")
    with pytest.raises(nats.errors.Error, match=f"no user JWT in {path}"):
        creds.sign("a-nonce")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SMSBUS_NATS_NKEY": "user"},
         "SMSBUS_NATS_NKEY: is for SMSBUS_NATS_URL's servers; the embedded one has no users"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": "user",
          "SMSBUS_NATS_CREDS": "creds"},
         "SMSBUS_NATS_NKEY: set SMSBUS_NATS_CREDS or SMSBUS_NATS_NKEY, not both"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": "creds"},
         "SMSBUS_NATS_NKEY: no NKEY seed in {creds}"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": "long"},
         "SMSBUS_NATS_NKEY: no NKEY seed in {long}"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": "account"},
         "SMSBUS_NATS_NKEY: the NKEY seed in {account} is not a user's (SU...)"),
        ({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": "/nonexistent/seed.nk"},
         "SMSBUS_NATS_NKEY: cannot read /nonexistent/seed.nk: No such file or directory"),
    ],
)  # fmt: skip
def test_a_nats_nkey_seed_file_is_checked_at_start(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    """SMSBUS_NATS_NKEY names a file with a user's NKEY seed alone (`nk -gen user`), read at start:
    anything else is one ConfigError naming the variable, never showing a seed."""
    kinds = {"user": nkeys.PREFIX_BYTE_USER, "account": nkeys.PREFIX_BYTE_ACCOUNT}
    seeds = {kind: key_pair(prefix).seed.decode() for kind, prefix in kinds.items()}
    files = {kind: tmp_path / f"{kind}.nk" for kind in seeds}
    for kind, seed in seeds.items():
        files[kind].write_text(seed + "\n")
    files["long"] = tmp_path / "long.nk"
    files["long"].write_text(seeds["user"] + "AAAAAAAA\n")
    files["creds"] = Operator().user(tmp_path / "u.creds", "u")[0]
    paths = {kind: str(path) for kind, path in files.items()}
    with pytest.raises(ConfigError) as info:
        load_settings({k: paths.get(v, v) for k, v in env.items()})
    assert str(info.value) == message.format_map(paths)
    assert [] == [seed for seed in seeds.values() if seed in str(info.value)]
    good = load_settings({"SMSBUS_NATS_URL": "nats://h:4222", "SMSBUS_NATS_NKEY": paths["user"]})
    assert good.nats_nkey is not None and seeds["user"] == good.nats_nkey.reveal()
    assert seeds["user"] not in repr(good)


@pytest.mark.parametrize(
    ("url", "user", "server"),
    [
        ("nats://smsbus:p%40ss%2Fw%3Ard@h:4222", ("smsbus", "p@ss/w:rd"), "nats://h:4222"),
        ("tls://s3cr%2Ft@[2001:db8::1]:4222", ("s3cr/t", None), "tls://[2001:db8::1]:4222"),
        ("nats://u:@h:4222", ("u", ""), "nats://h:4222"),
        ("nats://h:4222", None, "nats://h:4222"),
    ],
)
def test_a_nats_url_s_user_is_given_apart_and_decoded(
    url: str, user: tuple[str, str | None] | None, server: str
) -> None:
    """What nats-py is given: the server without its user, and the user and password (or
    token) as they are, not as the URL escapes them."""
    assert (user, server) == (url_user(url), without_user(url))


PROVIDERS = ("SMSPILOT", "SMSTOWER", "SMSPAGER", "SMSC", "EPOCHTA")
ODD_VALUES = ("[::1", "http://[::1", "https://[::1:80", "http://h:99999", "nats://[::1:4222",
              "-1", "1e309", "nan", "inf", "x" * 5000, "  ", "1,2", "9" * 30,
              "Europe/../../etc/passwd", "ftp://u:hunter2@h", "//h")  # fmt: skip


def _every_setting() -> list[str]:
    """Every SMSBUS_ variable the README names, each provider's in full."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    names = {n for n in re.findall(r"SMSBUS_[A-Z0-9_]+[A-Z0-9]", readme) if "_P_" not in n}
    names |= {f"SMSBUS_{p}_{s}" for p in PROVIDERS for s in ("URL", "TZ", "INTERVAL")}
    return sorted(names)


@pytest.mark.parametrize("name", _every_setting())
def test_no_value_of_a_setting_is_a_traceback(name: str) -> None:
    """Whatever a setting holds, start-up stops with a ConfigError (its one line) or goes on:
    never another exception, whose traceback the contract rules out, and never a URL's
    password."""
    for value in ODD_VALUES:
        env = {name: value}
        if name.startswith(("SMSBUS_NATS_TLS", "SMSBUS_NATS_CREDS", "SMSBUS_NATS_NKEY")):
            env["SMSBUS_NATS_URL"] = "nats://h:4222"
        try:
            load_settings(env)
        except ConfigError as exc:
            assert not name.endswith("_URL") or "hunter2" not in str(exc), (name, value)
