"""A bad setting or a missing resource stops `smsbus serve` with one line naming the variable;
the NATS connection's settings (a URL from a file, TLS with a private CA and a client
certificate, an operator-mode user's credentials file) work against real nats-servers, and TLS
asked for is never given up silently."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import nats.errors
import nkeys  # type: ignore[import-untyped]
import pytest

from bus.connection import _cause
from tests.accounts import Operator, key_pair, public
from tests.support import (
    SMSBUS,
    NatsServer,
    Smsbus,
    free_port,
    isolated_env,
    make_pki,
    public_key_sha256,
    read_stream,
    wait_for,
)


def serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": os.environ.get("PATH", ""),
        "SMSBUS_DATA_DIR": str(tmp_path / "data"),
        "SMSBUS_HTTP_PORT": str(free_port()),
        "SMSBUS_API_PORT": str(free_port()),
        "SMSBUS_EMBEDDED_NATS_PORT": str(free_port()),
        **env,
    }
    return subprocess.run(
        [SMSBUS, "serve"], env=full, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("env", "code", "message"),
    [
        ({"SMSBUS_HTTP_PORT": "99999"}, 2, "SMSBUS_HTTP_PORT: must be between 1 and 65535"),
        ({"SMSBUS_HTTP_PORT": "eighty"}, 2, "SMSBUS_HTTP_PORT: expected a whole number"),
        ({"SMSBUS_PUBLISH_TIMEOUT": "0"}, 2, "SMSBUS_PUBLISH_TIMEOUT: must be between"),
        ({"SMSBUS_LOG_FORMAT": "xml"}, 2, "SMSBUS_LOG_FORMAT: expected one of auto, json, console"),
        ({"SMSBUS_STREAM": "a.b"}, 2, "SMSBUS_STREAM: use letters, digits"),
        ({"SMSBUS_HTTP_HOST": "no-such-host.invalid"}, 1, "SMSBUS_HTTP_HOST: cannot resolve"),
        ({"SMSBUS_SMSPILOT_ALLOWED_IPS": "10.0.0.0/33"}, 2, "SMSBUS_SMSPILOT_ALLOWED_IPS: not an"),
        ({"SMSBUS_NATS_URL": "http://x:4222"}, 2, "SMSBUS_NATS_URL: not a NATS server URL"),
        (
            {"SMSBUS_NATS_URL": "nats://u:hunter2@[::1:4222"},
            2,
            "SMSBUS_NATS_URL: not a NATS server URL (Invalid IPv6 URL)",
        ),
        (
            {"SMSBUS_NATS_URL": "nats://a:4222,wss://u:hunter2@b:443"},
            2,
            "SMSBUS_NATS_URL: WebSocket URLs are not supported, use nats:// or tls://: "
            "'wss://***@b:443'",
        ),
        (
            {"SMSBUS_NATS_URL": "nats://u:hunter2@127.0.0.1:1", "SMSBUS_STARTUP_TIMEOUT": "2"},
            1,
            "SMSBUS_NATS_URL: cannot reach",
        ),
        ({"SMSBUS_STARTUP_TIMEOUT": "0"}, 2, "SMSBUS_STARTUP_TIMEOUT: must be between"),
        ({"SMSBUS_EMBEDDED_NATS_SYNC": "often"}, 2, "SMSBUS_EMBEDDED_NATS_SYNC: expected always"),
        ({"SMSBUS_EMBEDDED_NATS_SYNC": "0s"}, 2, "SMSBUS_EMBEDDED_NATS_SYNC: expected always"),
        (
            {"SMSBUS_DUPLICATE_WINDOW": "600", "SMSBUS_STREAM_MAX_AGE": "60"},
            2,
            "SMSBUS_DUPLICATE_WINDOW: must not be longer than SMSBUS_STREAM_MAX_AGE",
        ),
        (
            {"SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE": "/nonexistent/token"},
            2,
            "SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE: cannot read /nonexistent/token",
        ),
        (
            {"SMSBUS_SMSPILOT_CALLBACK_TOKEN": "short-secret"},
            2,
            "SMSBUS_SMSPILOT_CALLBACK_TOKEN: token 1 is shorter than 16 characters",
        ),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(
    tmp_path: Path, env: dict[str, str], code: int, message: str
) -> None:
    result = serve(tmp_path, **env)
    assert code == result.returncode
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"smsbus: {message}"), line
    assert "Traceback" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout
    assert "short-secret" not in result.stderr + result.stdout


def test_refused_nats_credentials_and_a_refused_connection_are_named(tmp_path: Path) -> None:
    """nats-py retries both until the attempt times out; the line says what the server or the
    network answered, not only that time ran out, and never the password."""
    server = NatsServer(
        tmp_path / "nats", config='authorization { user: smsbus, password: "right-pass-4f1e" }'
    ).start()
    try:
        url = f"nats://smsbus:wrong-pass-9c2d@127.0.0.1:{server.port}"
        refused = serve(tmp_path, SMSBUS_NATS_URL=url, SMSBUS_STARTUP_TIMEOUT="2")
    finally:
        server.stop()
    assert 1 == refused.returncode
    [line] = refused.stderr.strip().splitlines()
    assert line == (
        f"smsbus: SMSBUS_NATS_URL: cannot reach NATS at nats://***@127.0.0.1:{server.port}: "
        "nats: 'Authorization Violation'"
    )
    assert "wrong-pass" not in refused.stderr + refused.stdout

    port = free_port()
    nobody = serve(tmp_path, SMSBUS_NATS_URL=f"nats://127.0.0.1:{port}", SMSBUS_STARTUP_TIMEOUT="2")
    assert 1 == nobody.returncode
    [line] = nobody.stderr.strip().splitlines()
    assert line.startswith(f"smsbus: SMSBUS_NATS_URL: cannot reach NATS at nats://127.0.0.1:{port}")
    assert line.endswith("Connection refused"), line


def test_nats_credentials_from_a_file_are_used_and_never_shown(tmp_path: Path) -> None:
    """A NATS URL with a user and password is a secret: SMSBUS_NATS_URL_FILE reads it from a
    file (a Kubernetes Secret's), and nothing smsbus writes shows the password."""
    password = "file-pass-7b3a91"
    server = NatsServer(
        tmp_path / "nats", config=f'authorization {{ user: smsbus, password: "{password}" }}'
    ).start()
    url = f"nats://smsbus:{password}@127.0.0.1:{server.port}"
    secret = tmp_path / "nats-url"
    secret.write_text(f"{url}\n")
    bus = Smsbus(
        {"SMSBUS_NATS_URL_FILE": str(secret), "SMSBUS_STREAM": "FROMFILE"}, tmp_path / "bus"
    )
    try:
        bus.start()
        with httpx.Client() as client:
            bus.callback(client, "4242001")
        [stored] = read_stream(url, "FROMFILE", "sms.status.smspilot.>")
        assert "4242001" == stored.event["subject"]
        assert 0 == bus.stop()
        assert f"nats://***@127.0.0.1:{server.port}" in bus.logs()
        assert password not in bus.logs()
    finally:
        bus.kill()
        server.stop()

    both = serve(tmp_path, SMSBUS_NATS_URL=url, SMSBUS_NATS_URL_FILE=str(secret))
    assert 2 == both.returncode
    assert both.stderr.startswith("smsbus: SMSBUS_NATS_URL: set either SMSBUS_NATS_URL or")
    secret.write_text(f"http://smsbus:{password}@127.0.0.1:{server.port}")
    wrong = serve(tmp_path, SMSBUS_NATS_URL_FILE=str(secret))
    assert 2 == wrong.returncode
    [line] = wrong.stderr.strip().splitlines()
    assert line == (
        f"smsbus: SMSBUS_NATS_URL_FILE: not a NATS server URL: 'http://***@127.0.0.1:{server.port}'"
    )
    assert password not in both.stderr + both.stdout + wrong.stderr + wrong.stdout


def test_a_nats_password_is_decoded_and_taken_again_from_its_file(tmp_path: Path) -> None:
    """A password with characters a URL must escape (`@` as %40, `/` as %2F) is sent as the
    password it is, not as the URL writes it. A new password, in the servers' configuration
    (reloaded: the server drops the connections of the old one) and in SMSBUS_NATS_URL_FILE,
    is used from the next reconnection, without a restart; a file broken meanwhile leaves the
    password before it. No password in the logs, written either way."""
    old, new = "p@ss/w:rd#1%", "n3w/p@ss?"
    server = NatsServer(tmp_path / "nats", config=_users(old)).start()
    secret = tmp_path / "nats-url"

    def url(password: str) -> str:
        return f"nats://smsbus:{quote(password, safe='')}@127.0.0.1:{server.port}"

    secret.write_text(url(old) + "\n")
    env = {"SMSBUS_NATS_URL_FILE": str(secret), "SMSBUS_STREAM": "ROTATED"}
    bus = Smsbus(env, tmp_path / "bus")
    try:
        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242401")
            secret.write_text("nats://127.0.0.1:1\n")  # half rewritten: no user in it
            server.restart()
            wait_for(lambda: bus.reconnections() == 2, what="both connections back")
            kept = {(line["event"], line["error"]) for line in bus.log_lines()
                    if line["event"].startswith("NATS cred")}  # one a connection  # fmt: skip
            assert {("NATS credentials not read again; the last ones stay",
                     "SMSBUS_NATS_URL_FILE: no user")} == kept  # fmt: skip
            bus.callback(http, "4242402")
            secret.write_text(url(new) + "\n")
            server.reload(_users(new))  # the server drops the connections of the old password
            wait_for(lambda: bus.reconnections() == 4, what="both back, with the new one")
            wait_for(bus.ready, what="smsbus ready")
            bus.callback(http, "4242403")
        wait_for(lambda: bus.spool_depth() == 0, what="the spool to drain")
        stored = read_stream(server.url, "ROTATED", "sms.status.smspilot.>",
                             user="smsbus", password=new)  # fmt: skip
        assert ["4242401", "4242402", "4242403"] == [item.event["subject"] for item in stored]
        assert 0 == bus.stop()
        logs = bus.logs()
        assert [] == [p for p in (old, new, quote(old, safe=""), quote(new, safe="")) if p in logs]
    finally:
        bus.kill()
        server.stop()


def _users(password: str) -> str:
    return f'authorization {{ users = [ {{ user: smsbus, password: "{password}" }} ] }}'


def test_a_nats_server_with_mutual_tls_from_a_private_ca(tmp_path: Path) -> None:
    """A NATS whose certificate a private CA signed and which verifies its clients' certificates:
    SMSBUS_NATS_TLS_CA trusts that CA for NATS alone, SMSBUS_NATS_TLS_CERT and _KEY present the
    client's. What is missing or wrong stops start-up with one line; nothing is logged as a
    warning when the server closes a TLS connection at the stop."""
    pki = make_pki(tmp_path / "pki")
    (cert, key), (client_cert, client_key) = pki.server, pki.client
    server = NatsServer(
        tmp_path / "nats",
        config=f'tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{pki.ca}", '
        "verify: true }",
    ).start()
    url = f"tls://127.0.0.1:{server.port}"
    trusted = {"SMSBUS_NATS_URL": url, "SMSBUS_NATS_TLS_CA": str(pki.ca)}
    client = {"SMSBUS_NATS_TLS_CERT": str(client_cert), "SMSBUS_NATS_TLS_KEY": str(client_key)}
    bus = Smsbus({**trusted, **client, "SMSBUS_STREAM": "OVERTLS"}, tmp_path / "bus")
    try:
        lines = []
        for env in ({"SMSBUS_NATS_URL": url}, trusted):  # the system's CAs; no client certificate
            refused = serve(tmp_path, **env, SMSBUS_STARTUP_TIMEOUT="2")
            assert 1 == refused.returncode
            [line] = refused.stderr.strip().splitlines()
            assert line.startswith(f"smsbus: SMSBUS_NATS_URL: cannot reach NATS at {url}: "), line
            lines.append(line)
        assert "CERTIFICATE_VERIFY_FAILED" in lines[0], lines
        mismatched = serve(tmp_path, **trusted, SMSBUS_NATS_TLS_CERT=str(client_cert),
                           SMSBUS_NATS_TLS_KEY=str(key))  # fmt: skip
        assert 2 == mismatched.returncode
        [line] = mismatched.stderr.strip().splitlines()
        assert line.startswith(f"smsbus: SMSBUS_NATS_TLS_CERT: cannot use {client_cert}"), line

        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242002")
        tls = ssl.create_default_context(cafile=pki.ca)
        tls.load_cert_chain(client_cert, client_key)
        [stored] = read_stream(url, "OVERTLS", "sms.status.smspilot.>", tls=tls)
        assert "4242002" == stored.event["subject"]
        assert 0 == bus.stop()
        warnings = [
            entry for entry in map(json.loads, bus.logs().splitlines())
            if entry.get("level") in ("warning", "error")
        ]  # fmt: skip
        assert [] == warnings
    finally:
        bus.kill()
        server.stop()


def test_a_nats_server_in_operator_mode_with_a_credentials_file(tmp_path: Path) -> None:
    """A NATS whose accounts are JWTs (operator mode, as `nsc` or Synadia Cloud set it up) lets a
    client in only with a user's credentials file. Without one: one line. With one: callbacks
    stored. The file is read at each reconnection: a new user's file put in its place (the old
    user revoked, the server restarted) is taken without a restart of smsbus; a file broken
    meanwhile is an error in the log and another try, until it is mended. No seed in the logs."""
    operator = Operator()
    creds, seed = operator.user(tmp_path / "secret" / "smsbus.creds", "smsbus")
    server = NatsServer(tmp_path / "nats", config=operator.server_config()).start()
    env = {"SMSBUS_NATS_URL": server.url, "SMSBUS_NATS_CREDS": str(creds)}
    bus = Smsbus({**env, "SMSBUS_STREAM": "OPERATOR"}, tmp_path / "bus")
    try:
        refused = serve(tmp_path, SMSBUS_NATS_URL=server.url, SMSBUS_STARTUP_TIMEOUT="2")
        assert 1 == refused.returncode
        [line] = refused.stderr.strip().splitlines()
        assert line == f"smsbus: SMSBUS_NATS_URL: cannot reach NATS at {server.url}: " + (
            "nats: 'Authorization Violation'"
        ), line

        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242101")
            # A new user's file in its place; the old user revoked, the server restarted.
            rotated, new_seed = operator.user(tmp_path / "new.creds", "smsbus-2")
            creds.write_bytes(rotated.read_bytes())
            server.restart(operator.server_config(revoked=(seed,)))
            wait_for(lambda: bus.reconnections() == 2, timeout=15, what="both back as the new user")
            bus.callback(http, "4242102")
            # A file that is no longer one, the server restarted: refused, said, tried again.
            creds.write_text("replaced by mistake\n")
            server.restart()
            wait_for(lambda: f"no user JWT in {creds}" in bus.logs(),
                     what="the broken file's error")  # fmt: skip
            reason = bus.readyz()["reason"]
            assert reason == f"NATS is not connected: no user JWT in {creds}: " + (
                "not a NATS credentials file"
            ), reason
            creds.write_bytes(rotated.read_bytes())
            wait_for(lambda: bus.reconnections() == 4, timeout=15, what="both back, mended")
            bus.callback(http, "4242103")
        wait_for(lambda: bus.spool_depth() == 0, timeout=15, what="the spool to drain")
        stored = read_stream(server.url, "OPERATOR", "sms.status.smspilot.>",
                             user_credentials=str(rotated))  # fmt: skip
        assert ["4242101", "4242102", "4242103"] == [item.event["subject"] for item in stored]
        assert 0 == bus.stop()
        logs = bus.logs()
        assert seed not in logs and new_seed not in logs
        broken = [line["connection"] for line in bus.log_lines()
                  if "no user JWT" in line.get("error", "")]  # fmt: skip
        assert sorted(broken) == sorted(set(broken)), "one line per connection, for every try"
    finally:
        bus.kill()
        server.stop()


def test_a_user_whose_jwt_expires_gets_back_in_with_a_new_file(tmp_path: Path) -> None:
    """The server closes the connection of a user whose JWT expires, with an `-ERR` (nats-py,
    left to itself, then closes the client for good: smsbus never ready again). smsbus keeps
    trying, says why in /readyz, answers callbacks from the spool, and is back on NATS with the
    file's next version; nothing answered is lost."""
    operator = Operator()
    expires = time.time() + 8  # time to start and answer a first callback on a busy machine
    creds, _ = operator.user(tmp_path / "secret" / "smsbus.creds", "smsbus", expires=expires)
    server = NatsServer(tmp_path / "nats", config=operator.server_config()).start()
    env = {"SMSBUS_NATS_URL": server.url, "SMSBUS_NATS_CREDS": str(creds)}
    bus = Smsbus({**env, "SMSBUS_STREAM": "EXPIRES"}, tmp_path / "bus")
    try:
        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242301")
            refused = "NATS is not connected: nats: 'Authorization Violation'"
            wait_for(lambda: bus.readyz()["reason"] == refused, timeout=expires - time.time() + 10,
                     what="the expired JWT refused")  # fmt: skip
            bus.callback(http, "4242302")
            assert 1 == bus.spool_depth()
            renewed, _ = operator.user(tmp_path / "renewed.creds", "smsbus")
            creds.write_bytes(renewed.read_bytes())
            wait_for(bus.ready, timeout=10, what="smsbus back on NATS")
        wait_for(lambda: bus.spool_depth() == 0, timeout=15, what="the spool to drain")
        stored = read_stream(server.url, "EXPIRES", "sms.status.smspilot.>",
                             user_credentials=str(renewed))  # fmt: skip
        assert ["4242301", "4242302"] == [item.event["subject"] for item in stored]
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()


def test_a_nats_server_that_knows_its_users_by_nkey(tmp_path: Path) -> None:
    """A NATS whose configuration names its users by their NKEYs (`users = [{nkey: U...}]`):
    SMSBUS_NATS_NKEY's seed signs the server's nonce; without it, one line; the seed in no log."""
    user = key_pair(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "secret" / "smsbus.nk"
    seed_file.parent.mkdir()
    seed_file.write_text(user.seed.decode() + "\n")
    config = f'authorization {{ users = [ {{ nkey: "{public(user)}" }} ] }}'
    server = NatsServer(tmp_path / "nats", config=config).start()
    env = {"SMSBUS_NATS_URL": server.url, "SMSBUS_NATS_NKEY": str(seed_file)}
    bus = Smsbus({**env, "SMSBUS_STREAM": "BYNKEY"}, tmp_path / "bus")
    try:
        refused = serve(tmp_path, SMSBUS_NATS_URL=server.url, SMSBUS_STARTUP_TIMEOUT="2")
        assert 1 == refused.returncode
        assert "'Authorization Violation'" in refused.stderr, refused.stderr
        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242201")
        stored = read_stream(server.url, "BYNKEY", "sms.status.smspilot.>",
                             nkeys_seed_str=user.seed.decode())  # fmt: skip
        assert ["4242201"] == [item.event["subject"] for item in stored]
        assert 0 == bus.stop()
        assert user.seed.decode() not in bus.logs()
    finally:
        bus.kill()
        server.stop()


def test_a_client_certificate_renewed_under_a_running_smsbus_is_presented_from_then_on(
    tmp_path: Path,
) -> None:
    """cert-manager renews the client certificate in the mounted Secret (a new key, the files
    swapped at once, as the kubelet swaps a Secret's folder), and the server comes to take only
    the new one (`pinned_certs`, reloaded: it drops connections presenting another, as it
    refuses an expired one). The reconnection presents the renewed certificate; before, the one
    read at start was presented at every reconnection, refused for as long as smsbus ran."""
    pki = make_pki(tmp_path / "pki")
    (cert, key), first = pki.server, pki.client
    renewed = pki.client_again("smsbus-renewed")
    secret = tmp_path / "secret"  # what the pod sees: a link the kubelet swaps
    mismatched = (renewed[0], first[1])  # a certificate beside another's key
    for version, (client_cert, client_key) in (("v1", first), ("v2", renewed), ("v3", mismatched)):
        (tmp_path / version).mkdir()
        shutil.copy(client_cert, tmp_path / version / "tls.crt")
        shutil.copy(client_key, tmp_path / version / "tls.key")
    secret.symlink_to(tmp_path / "v1")

    def swap(version: str) -> None:
        (tmp_path / "swap").symlink_to(tmp_path / version)
        (tmp_path / "swap").replace(secret)

    def pinned(client_cert: Path) -> str:
        return (f'tls {{ cert_file: "{cert}", key_file: "{key}", ca_file: "{pki.ca}", '
                f'verify: true, pinned_certs: ["{public_key_sha256(client_cert)}"] }}')  # fmt: skip

    server = NatsServer(tmp_path / "nats", config=pinned(first[0])).start()
    url = f"tls://127.0.0.1:{server.port}"
    bus = Smsbus({"SMSBUS_NATS_URL": url, "SMSBUS_NATS_TLS_CA": str(pki.ca),
                  "SMSBUS_NATS_TLS_CERT": str(secret / "tls.crt"),
                  "SMSBUS_NATS_TLS_KEY": str(secret / "tls.key"),
                  "SMSBUS_STREAM": "RENEWED"}, tmp_path / "bus").start()  # fmt: skip
    try:
        # Files that cannot be used leave the last ones in use: a reconnection goes on with them.
        swap("v3")
        server.restart()
        wait_for(lambda: bus.reconnections() >= 2, timeout=30, what="smsbus back on NATS")
        assert "NATS TLS files not read again; the last ones stay" in bus.logs()

        swap("v2")
        server.reload(pinned(renewed[0]))  # the server drops the connections with the old one
        wait_for(lambda: bus.reconnections() >= 4, timeout=30, what="smsbus back on NATS")
        wait_for(bus.ready, timeout=10, what="smsbus ready")
        with httpx.Client() as http:
            bus.callback(http, "4242003")
        tls = ssl.create_default_context(cafile=pki.ca)
        tls.load_cert_chain(*renewed)
        [stored] = read_stream(url, "RENEWED", "sms.status.smspilot.>", tls=tls)
        assert "4242003" == stored.event["subject"]
        assert "NATS TLS files read again" in bus.logs()
    finally:
        assert 0 == bus.stop()
        server.stop()


def test_a_nats_server_without_tls_is_refused_when_tls_is_asked_for(tmp_path: Path) -> None:
    """nats-py turns to TLS only when the server asks for it: a `tls://` URL or the TLS settings
    would otherwise talk to a server that offers no TLS in the clear. At start that is one line
    and exit 1; a reconnect to such a server (here the TLS server replaced by a plain one on the
    same port) is an error line."""
    pki = make_pki(tmp_path / "pki")
    plain = NatsServer(tmp_path / "plain").start()
    try:
        for env, asked in (
            ({"SMSBUS_NATS_URL": f"tls://127.0.0.1:{plain.port}"}, "a tls:// URL"),
            ({"SMSBUS_NATS_URL": plain.url, "SMSBUS_NATS_TLS_CA": str(pki.ca)},
             "SMSBUS_NATS_TLS_*"),
        ):  # fmt: skip
            refused = serve(tmp_path, **env)
            assert 1 == refused.returncode
            [line] = refused.stderr.strip().splitlines()
            assert line.startswith("smsbus: SMSBUS_NATS_URL: the NATS server at "), line
            assert line.endswith(f":{plain.port} does not use TLS, which {asked} asks for"), line
    finally:
        plain.stop()

    cert, key = pki.server
    tls = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}'
    server = NatsServer(tmp_path / "nats", config=tls).start()
    url = f"tls://127.0.0.1:{server.port}"
    bus = Smsbus({"SMSBUS_NATS_URL": url, "SMSBUS_NATS_TLS_CA": str(pki.ca)}, tmp_path / "bus")
    try:
        bus.start()
        server.restart("")  # the same store, no TLS
        plain = f"the NATS server at {url} does not use TLS, which SMSBUS_NATS_TLS_* asks for"
        wait_for(lambda: bus.readyz()["reason"] == f"NATS is not connected: {plain}",
                 timeout=20, what="the reconnection refused")  # fmt: skip
        server.restart(tls)
        wait_for(bus.ready, timeout=20, what="smsbus back on the TLS server")
        assert 0 == bus.stop()
        lines = bus.log_lines()
        assert {"smsbus", "smsbus-reads"} == {
            line["connection"] for line in lines
            if line["event"] == "nats reconnection failed; retrying" and line["error"] == plain
        }  # fmt: skip
        assert 2 == bus.reconnections()  # both, with TLS
    finally:
        bus.kill()
        server.stop()


def test_a_nats_server_that_offers_tls_without_requiring_it_is_used_over_tls(
    tmp_path: Path,
) -> None:
    """A server with `allow_non_tls` takes both; nats-py, left to itself, chose the clear one
    even under a `tls://` URL (and smsbus then stopped: "does not use TLS"). smsbus's
    connections to it are encrypted, as the server's own list of connections shows."""
    pki = make_pki(tmp_path / "pki")
    cert, key = pki.server
    monitor = free_port()
    config = (f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\nallow_non_tls: true\n'
              f"http: 127.0.0.1:{monitor}\n")  # fmt: skip
    server = NatsServer(tmp_path / "nats", config=config).start()
    url = f"tls://127.0.0.1:{server.port}"
    bus = Smsbus({"SMSBUS_NATS_URL": url, "SMSBUS_NATS_TLS_CA": str(pki.ca),
                  "SMSBUS_STREAM": "EITHER"}, tmp_path / "bus")  # fmt: skip
    try:
        bus.start()
        with httpx.Client() as http:
            bus.callback(http, "4242501")
            connz = http.get(f"http://127.0.0.1:{monitor}/connz").json()
        ours = {c["name"]: c.get("tls_version") for c in connz["connections"]}
        assert {"smsbus", "smsbus-reads"} <= set(ours), ours
        assert all(ours[name] for name in ("smsbus", "smsbus-reads")), ours
        [stored] = read_stream(server.url, "EITHER", "sms.status.smspilot.>")  # in the clear
        assert "4242501" == stored.event["subject"]
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()


def test_start_up_says_at_once_that_nats_refuses(tmp_path: Path) -> None:
    """nats-py retries inside an attempt for up to 5 s; the first refusal is logged when it
    happens, not when the attempt times out (here never: the start-up gives up first)."""
    port = free_port()
    result = serve(tmp_path, SMSBUS_NATS_URL=f"nats://127.0.0.1:{port}",
                   SMSBUS_STARTUP_TIMEOUT="2", SMSBUS_LOG_FORMAT="json")  # fmt: skip
    assert 1 == result.returncode
    [retrying, *_] = [
        line for line in map(json.loads, result.stdout.splitlines())
        if line["event"] == "NATS not reachable yet; retrying"
    ]  # fmt: skip
    assert f"nats://127.0.0.1:{port}" == retrying["nats"]
    assert retrying["error"].endswith("Connection refused"), retrying


def test_the_reset_that_follows_a_refusal_does_not_hide_it() -> None:
    """The server closes the socket right after its -ERR; a client that reads the close first
    sees a reset, at any of its tries. What the server said last is still the cause named."""
    refusal = nats.errors.Error("nats: 'Authorization Violation'")  # as nats-py raises it
    errors: list[BaseException] = [refusal, ConnectionResetError(104, "Connection reset by peer")]
    assert "nats: 'Authorization Violation'" == _cause([*errors, TimeoutError()])
    assert "nats: 'Authorization Violation'" == _cause([*errors, nats.errors.UnexpectedEOF()])
    reset = [ConnectionResetError(104, "Connection reset by peer"), TimeoutError()]
    assert "[Errno 104] Connection reset by peer" == _cause(reset)
    assert "TimeoutError" in _cause([TimeoutError()])


def test_a_nats_server_without_jetstream_is_named(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", jetstream=False).start()
    try:
        result = serve(tmp_path, SMSBUS_NATS_URL=server.url, SMSBUS_STARTUP_TIMEOUT="2")
    finally:
        server.stop()
    assert 1 == result.returncode
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "smsbus: SMSBUS_STREAM: cannot create or update SMS and its buckets: no JetStream "
        "answered: is JetStream enabled on this NATS server and account?"
    )


def test_http_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = serve(tmp_path, SMSBUS_HTTP_PORT=str(port))
    assert 1 == result.returncode
    assert result.stderr.startswith(f"smsbus: SMSBUS_HTTP_PORT: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_embedded_nats_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = serve(tmp_path, SMSBUS_EMBEDDED_NATS_PORT=str(port))
    assert 1 == result.returncode
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"smsbus: SMSBUS_EMBEDDED_NATS_PORT: 127.0.0.1:{port} is not free")


def test_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = serve(tmp_path, SMSBUS_DATA_DIR=str(not_a_dir / "data"))
    assert 1 == result.returncode
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"smsbus: SMSBUS_DATA_DIR: {not_a_dir / 'data'} is not writable")


def test_a_data_dir_in_use_by_another_smsbus_is_one_line(tmp_path: Path) -> None:
    """Two processes on one data directory (`--pollers-only` beside `--no-pollers` with the
    default one, two pods on one shared volume) would drain one spool with two sets of
    bookkeeping and start two nats-servers on one store: the second stops with one line. The
    first one's end, however it ends, frees the directory."""
    server = NatsServer(tmp_path / "nats").start()
    first = Smsbus({"SMSBUS_NATS_URL": server.url}, tmp_path / "data").start()
    try:
        assert first.proc is not None
        result = serve(tmp_path, SMSBUS_NATS_URL=server.url)
        assert 1 == result.returncode
        assert (
            f"smsbus: SMSBUS_DATA_DIR: {tmp_path / 'data'} is in use by another smsbus "
            f"(pid {first.proc.pid}); give each process a data directory of its own\n"
        ) == result.stderr
        assert first.ready()
        first.kill()  # the system drops its lock
        again = Smsbus({"SMSBUS_NATS_URL": server.url}, tmp_path / "data").start()
        assert 0 == again.stop()
    finally:
        first.kill()
        server.stop()


def test_a_stop_signal_while_waiting_for_nats_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C or a pod's SIGTERM during start-up, which waits up to SMSBUS_STARTUP_TIMEOUT for
    NATS, ends the process then, not a minute later."""
    bus = Smsbus(
        {"SMSBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}", "SMSBUS_STARTUP_TIMEOUT": "60"},
        tmp_path / "data",
    )
    bus.start(wait_ready=False)
    try:
        wait_for(
            lambda: any(line.get("event") == "NATS not reachable yet; retrying"
                        for line in bus.log_lines()),
            what="start-up to wait for NATS",
        )  # fmt: skip
        asked = time.monotonic()
        assert 0 == bus.stop(timeout=10)
        assert time.monotonic() - asked < 5
    finally:
        if bus.proc is not None and bus.proc.poll() is None:
            bus.kill()
    assert "Traceback" not in bus.logs()


def test_the_log_of_a_run_is_json_lines_in_order_each_said_once(tmp_path: Path) -> None:
    """Lines of uvicorn's own (here the warning for a request it cannot parse) take the form of
    smsbus's and their place among them; the two listeners' start and stop are said once, by
    smsbus's `serving` and `stopped`."""
    bus = Smsbus({}, tmp_path / "data").start()
    try:
        assert "OK" == httpx.get(f"{bus.base}/callbacks/smspilot?server_id=7&status=2").text
        wait_for(lambda: any(line.get("event") == "callback" for line in bus.log_lines()),
                 what="the callback's summary line")  # fmt: skip
        with socket.create_connection(("127.0.0.1", bus.port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
        assert 0 == bus.stop()
    finally:
        if bus.proc is not None and bus.proc.poll() is None:
            bus.kill()
    raw = bus.logs().splitlines()
    assert raw and all(line.startswith("{") and '", "' not in line for line in raw), raw
    lines = [json.loads(line) for line in raw]
    events = [line["event"] for line in lines]
    for said_once in ("serving", "stop signal: finishing the requests in flight, then stopping",
                      "stopped", "Invalid HTTP request received."):  # fmt: skip
        assert 1 == events.count(said_once), events
    assert not [e for e in events if "server process" in e or e == "Shutting down"], events
    assert (
        events.index("serving") < events.index("callback")
        < events.index("Invalid HTTP request received.") < events.index("stopped")
    ), events  # fmt: skip
    stamps = [line["timestamp"] for line in lines]
    assert sorted(stamps) == stamps, list(zip(events, stamps, strict=True))


def test_a_stdout_nobody_reads_holds_up_no_callback(tmp_path: Path) -> None:
    """smsbus's stdout a pipe whose reader has paused (`make run | less`, a log driver that
    blocks while its endpoint is away): callbacks and /readyz are answered all the while, and
    the reader, once back, gets every line, the last one `stopped`."""
    nats = NatsServer(tmp_path / "nats").start()
    read, write = os.pipe()
    bus = Smsbus(isolated_env(nats.url), tmp_path / "bus", output=write).start()
    os.close(write)
    try:
        ids = [str(900_000 + i) for i in range(1000)]  # some 250 KB of lines, 4 pipes' worth
        with httpx.Client(base_url=bus.base, timeout=5) as client:
            for server_id in ids:
                bus.callback(client, server_id)
            assert 200 == client.get("/readyz").status_code
            assert "\nsmsbus_log_lines_lost_total 0.0\n" in client.get("/metrics").text
        bus.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        with os.fdopen(read, "rb") as lines:  # the reader is back
            events = [json.loads(line) for line in lines]  # until smsbus has exited
        assert 0 == bus.proc.wait(10)  # type: ignore[union-attr]
    finally:
        bus.stop(signal.SIGKILL) if bus.proc and bus.proc.poll() is None else None
        nats.stop()
    assert ids == [e["server_id"] for e in events if e["event"] == "callback"]
    assert "stopped" == events[-1]["event"]
    assert not [e for e in events if e["event"].startswith("log lines lost")]
