"""Who may call the callback route: tokens (a comma list, from a file), the IP allowlist, and
X-Forwarded-For believed only from trusted proxies. Secrets never leak into logs or metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

OLD_TOKEN = "old-token-0123456789abcdef"
NEW_TOKEN = "new-token-fedcba9876543210"


@pytest.fixture(scope="module")
def tokened(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    data = tmp_path_factory.mktemp("tokened")
    token_file = data / "token"
    token_file.write_text(f"{OLD_TOKEN},{NEW_TOKEN}\n")
    env = isolated_env(nats_server.url, SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE=str(token_file))
    bus = Smsbus(env, data).start()
    yield bus
    assert 0 == bus.stop()


def get(bus: Smsbus, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    params = {"server_id": "42", "status": "2"}
    return httpx.get(f"{bus.base}{path}", params=params, headers=headers, timeout=10)


def test_with_tokens_only_the_token_routes_publish(tokened: Smsbus) -> None:
    assert 404 == get(tokened, "/callbacks/smspilot").status_code
    assert 404 == get(tokened, "/callbacks/smspilot/wrong-token-0123456789").status_code
    assert 404 == get(tokened, f"/callbacks/smspilot/{OLD_TOKEN}x").status_code
    assert "OK" == get(tokened, f"/callbacks/smspilot/{OLD_TOKEN}").text
    assert "OK" == get(tokened, f"/callbacks/smspilot/{NEW_TOKEN}").text


def test_tokens_never_reach_logs_metrics_or_dead_letters(
    tokened: Smsbus, nats_server: NatsServer
) -> None:
    get(tokened, f"/callbacks/smspilot/{NEW_TOKEN}")
    bad = httpx.get(
        f"{tokened.base}/callbacks/smspilot/{NEW_TOKEN}", params={"status": "x"}, timeout=10
    )
    assert 400 == bad.status_code
    letters = read_stream(nats_server.url, tokened.stream, f"{tokened.prefix}.deadletter.>")
    assert "/callbacks/smspilot/***" == letters[-1].event["data"]["raw"]["path"]
    metrics = httpx.get(f"{tokened.base}/metrics", timeout=5).text
    wrong = f"{NEW_TOKEN[:-1]}Z"
    bodies = [
        bad.text,
        get(tokened, f"/callbacks/smspilot/{wrong}").text,
        httpx.put(f"{tokened.base}/callbacks/smspilot/{NEW_TOKEN}", timeout=10).text,
        httpx.get(f"{tokened.base}/readyz", timeout=10).text,
    ]
    assert wrong not in tokened.logs()
    for secret in (OLD_TOKEN, NEW_TOKEN):
        assert secret not in tokened.logs()
        assert secret not in metrics
        assert all(secret not in str(letter.event) for letter in letters)
        assert all(secret not in body and wrong not in body for body in bodies)


def test_a_token_file_rotated_under_a_running_smsbus_is_taken_without_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A Kubernetes Secret rolled over as the README says: the new token beside the old one,
    SMSPilot's callback URL moved to the new one, then the old one removed. Each step is
    taken from the file within TOKENS_READ_EVERY, no restart; a file that holds a token start-up
    would refuse leaves the tokens in use."""
    token_file = tmp_path / "token"

    def rotate(text: str) -> None:  # as kubelet updates a mounted Secret: a whole new file
        (tmp_path / "token.new").write_text(text)
        (tmp_path / "token.new").rename(token_file)

    def answers(token: str) -> int:
        return get(bus, f"/callbacks/smspilot/{token}").status_code

    rotate(f"{OLD_TOKEN}\n")
    env = isolated_env(nats_server.url, SMSBUS_SMSPILOT_CALLBACK_TOKEN_FILE=str(token_file))
    bus = Smsbus(env, tmp_path / "bus").start()
    try:
        assert (200, 404) == (answers(OLD_TOKEN), answers(NEW_TOKEN))
        rotate(f"{OLD_TOKEN},{NEW_TOKEN}\n")
        wait_for(lambda: answers(NEW_TOKEN) == 200, timeout=15, what="the new token taken")
        assert 200 == answers(OLD_TOKEN)
        rotate(f"{NEW_TOKEN}\n")
        wait_for(lambda: answers(OLD_TOKEN) == 404, timeout=15, what="the old token gone")
        assert 200 == answers(NEW_TOKEN)
        assert 2 == bus.logs().count("callback tokens read again from their file")

        too_short = "tiny-Tok3n-x"
        rotate(f"{NEW_TOKEN},{too_short}\n")
        wait_for(lambda: answers(NEW_TOKEN) == 200 and "callback tokens not read again" in
                 bus.logs(), timeout=15, what="the bad file told of")  # fmt: skip
        assert 404 == answers(too_short)
        assert "token 2 is shorter than 16 characters" in bus.logs()
        for secret in (OLD_TOKEN, NEW_TOKEN, too_short):
            assert secret not in bus.logs()
    finally:
        assert 0 == bus.stop()


def allowlisted(nats_server: NatsServer, data: Path, **extra: str) -> Smsbus:
    env = isolated_env(nats_server.url, SMSBUS_SMSPILOT_ALLOWED_IPS="10.0.0.0/8", **extra)
    return Smsbus(env, data).start()


def test_peer_outside_the_allowlist_is_403_even_with_a_forged_header(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bus = allowlisted(nats_server, tmp_path)
    try:
        assert 403 == get(bus, "/callbacks/smspilot").status_code
        assert 403 == get(bus, "/callbacks/smspilot", {"X-Forwarded-For": "10.1.2.3"}).status_code
    finally:
        assert 0 == bus.stop()


def test_behind_a_trusted_proxy_the_nearest_untrusted_hop_is_judged(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bus = allowlisted(nats_server, tmp_path, SMSBUS_TRUSTED_PROXIES="127.0.0.1/32,192.168.0.0/16")
    try:
        assert 200 == get(bus, "/callbacks/smspilot", {"X-Forwarded-For": "10.1.2.3"}).status_code
        via_two_proxies = {"X-Forwarded-For": "10.1.2.3, 192.168.1.1"}
        assert 200 == get(bus, "/callbacks/smspilot", via_two_proxies).status_code
        spoofed = {"X-Forwarded-For": "10.1.2.3, 203.0.113.7"}
        assert 403 == get(bus, "/callbacks/smspilot", spoofed).status_code
        assert 403 == get(bus, "/callbacks/smspilot", {"X-Forwarded-For": "8.8.8.8"}).status_code
        assert 403 == get(bus, "/callbacks/smspilot").status_code  # the proxy itself is not in it
    finally:
        assert 0 == bus.stop()
