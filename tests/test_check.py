"""`smsbus check`: one line per part, non-zero exit on any failure, no secret printed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.fakes.epochta import FakeEpochta
from tests.fakes.server import Served
from tests.fakes.smsc import FakeSmsc
from tests.fakes.smstower import FakeSmstower
from tests.support import SMSBUS, NatsServer, free_port


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SMSBUS, "check"],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_reports_each_provider(nats_server: NatsServer, tmp_path: Path) -> None:
    tower, pochta, smsc = FakeSmstower(balance="77"), FakeEpochta(), FakeSmsc()
    with Served(tower.app) as t, Served(pochta.app) as p, Served(smsc.app) as s:
        base = {
            "SMSBUS_NATS_URL": nats_server.url,
            "SMSBUS_SMSTOWER_URL": t.url,
            "SMSBUS_SMSTOWER_LOGIN": tower.login,
            "SMSBUS_SMSTOWER_PASSWORD": tower.password,
            "SMSBUS_SMSC_URL": s.url,
            "SMSBUS_SMSC_LOGIN": smsc.login,
            "SMSBUS_SMSC_PASSWORD": smsc.password,
            "SMSBUS_EPOCHTA_URL": p.url,
            "SMSBUS_EPOCHTA_USERNAME": pochta.username,
            "SMSBUS_EPOCHTA_PASSWORD": "not-the-password",
            # SMS-Pager's address mistaken for another's: a host with no SMS-Pager API.
            "SMSBUS_SMSPAGER_URL": t.url,
            "SMSBUS_SMSPAGER_LOGIN": "pager-login",
            "SMSBUS_SMSPAGER_PASSWORD": "pager-secret-pw",
        }
        result = check(base)
    assert 1 == result.returncode
    lines = result.stdout.strip().splitlines()
    assert [
        "config: ok",
        f"nats: ok ({nats_server.url})",
        "smspilot: off (no credentials)",
        "smstower: ok (balance 77 SMS)",
        f"smspager: FAILED: {t.url}/balance.xml answered HTTP 404: no API there; is "
        "SMSBUS_<P>_URL the provider's API address (scheme, host and port)?",
        "smsc: ok (history readable)",
        "epochta: FAILED: status -1: AUTH_FAILED: wrong login or password",
    ] == lines
    for secret in (tower.password, smsc.password, "not-the-password", "pager-secret-pw"):
        assert secret not in result.stdout + result.stderr


def test_check_fails_without_nats(tmp_path: Path) -> None:
    result = check({"SMSBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"})
    assert 1 == result.returncode
    assert result.stdout.splitlines()[1].startswith("nats: FAILED: SMSBUS_NATS_URL: cannot reach")


def test_check_says_when_nats_has_no_jetstream_and_is_quiet_when_all_is_well(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    plain = NatsServer(tmp_path / "plain", jetstream=False).start()
    try:
        without = check({"SMSBUS_NATS_URL": plain.url})
    finally:
        plain.stop()
    assert 1 == without.returncode
    assert (
        "nats: FAILED: JetStream is not available: no JetStream answered: is JetStream enabled "
        "on this NATS server and account?"
    ) == without.stdout.splitlines()[1]

    fine = check({"SMSBUS_NATS_URL": nats_server.url})
    assert 0 == fine.returncode, fine.stdout
    assert "" == fine.stderr  # closing its own connection is not a disconnect to warn about
