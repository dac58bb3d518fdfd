from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from bus.config import Secret, Settings, load_settings, redact_url
from bus.errors import ConfigError


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
