"""`smsbus deadletters` lists what was dead-lettered and `smsbus replay` feeds it through today's
parsers (CONTRACT.md section 6): a real malformed callback and real junk on `sms.track` stay dead
and make the command fail; dead letters of input that a fixed release accepts (a windows-1251 form
and a multipart form refused by an older release, a registration it refused) are published once,
however often they are replayed, and leave the dead-letter subject."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest

from bus.events import deadletter_event
from tests.support import SMSBUS, NatsServer, Smsbus, isolated_env, read_stream, wait_for

_ids = itertools.count(random.randrange(10**9, 10**10))


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("replay")).start()
    yield bus
    assert 0 == bus.stop()


def cli(bus: Smsbus, *args: str) -> tuple[int, list[dict[str, Any]]]:
    env = {"PATH": os.environ.get("PATH", ""), **bus.env}
    done = subprocess.run([SMSBUS, *args], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


def letters(bus: Smsbus, *filters: str) -> list[dict[str, Any]]:
    code, lines = cli(bus, "deadletters", *filters)
    assert code == 0
    return lines


def kept(bus: Smsbus, nats_url: str, **fields: Any) -> None:
    """Put a dead letter on the stream as a release that refused this input wrote it."""
    provider = fields.pop("provider")
    event = deadletter_event(bus.prefix, provider, received_at=datetime.now(UTC), **fields)

    async def publish() -> None:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(event.subject, event.payload, headers=event.headers)
        finally:
            await nc.close()

    asyncio.run(publish())


def status_events(bus: Smsbus, nats_url: str, message_id: str) -> list[dict[str, Any]]:
    stored = read_stream(nats_url, bus.stream, f"{bus.prefix}.status.>")
    return [s.event for s in stored if s.event["subject"] == message_id]


def test_a_malformed_callback_stays_dead_and_the_replay_fails(service: Smsbus) -> None:
    server_id = str(next(_ids))
    answer = httpx.get(
        f"{service.base}/callbacks/smspilot?server_id={server_id}&status=abc&ref=%C7%E0%EA%E0%E7"
    )
    assert answer.status_code == 400
    mine = wait_for(
        lambda: [d for d in letters(service, "--reason", "status") if server_id in str(d["raw"])],
        what="the malformed callback's dead letter",
    )
    assert len(mine) == 1
    letter = mine[0]
    assert isinstance(letter["seq"], int)
    assert letter["reason"] == "status must be a whole number"
    # Kept as the parser reads it: windows-1251 bytes as %XX escapes, nothing replaced.
    assert letter["raw"]["query"] == {
        "server_id": server_id,
        "status": "abc",
        "ref": "%C7%E0%EA%E0%E7",
    }

    code, lines = cli(service, "replay", str(letter["seq"]))
    assert code == 1
    assert lines[0]["outcome"] == "failed"
    assert lines[0]["reason"] == "status must be a whole number"
    assert lines[-1] == {"summary": True, "replayed": 0, "already": 0, "failed": 1, "skipped": 0}
    assert [d["seq"] for d in letters(service) if d["seq"] == letter["seq"]] == [letter["seq"]]
    assert status_events(service, service.env["SMSBUS_NATS_URL"], server_id) == []


def test_callbacks_an_older_release_refused_are_published_once(service: Smsbus) -> None:
    url = service.env["SMSBUS_NATS_URL"]
    form_id, multipart_id = str(next(_ids)), str(next(_ids))
    service.register(
        {"provider": "smspilot", "message_id": form_id, "phone": "79001234567", "client_ref": "o-1"}
    )
    boundary = "x7MA4YWxkTrZu0gW"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="server_id"\r\n\r\n{multipart_id}'
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="status"\r\n\r\n-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="error"\r\n\r\n600\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    reason = "an older release's reason"
    kept(
        service, url, provider="smspilot", reason=reason, method="POST",
        path="/callbacks/smspilot/***", query={}, peer="10.0.0.7",
        body=f"server_id={form_id}&status=2&ref=".encode() + "Заказ".encode("cp1251"),
        content_type="application/x-www-form-urlencoded",
    )  # fmt: skip
    # Before `content_type` was kept: the multipart boundary is read off the body.
    kept(
        service, url, provider="smspilot", reason=reason, method="POST",
        path="/callbacks/smspilot", query={"tag": "a"}, peer=None, body=multipart,
    )  # fmt: skip
    wait_for(lambda: len(letters(service, "--reason", reason)) == 2, what="two dead letters")
    [before] = [d for d in letters(service, "--reason", reason) if d["raw"].get("body_encoding")]
    assert before["raw"]["body_encoding"] == "base64"  # not UTF-8: kept byte for byte

    code, lines = cli(service, "replay", "--reason", reason, "--keep")
    assert code == 0, lines
    assert [line["outcome"] for line in lines[:-1]] == ["replayed", "replayed"]
    assert lines[-1]["replayed"] == 2

    def published() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return status_events(service, url, form_id), status_events(service, url, multipart_id)

    form, multi = published()
    assert [e["data"]["status"] for e in form] == ["delivered"]
    assert form[0]["data"]["phone"] == "79001234567" and form[0]["data"]["client_ref"] == "o-1"
    assert form[0]["data"]["callback_params"] == {"ref": "%C7%E0%EA%E0%E7"}
    assert form[0]["data"]["via"] == "callback"
    assert [e["data"]["status"] for e in multi] == ["expired"]
    assert multi[0]["data"]["callback_params"] == {"tag": "a"}
    assert lines[0]["events"] == [form[0]["id"]]
    # The replay wrote the state as it published (nothing else projects status events).
    state = httpx.get(f"{service.api}/v1/messages/smspilot/{form_id}").json()
    assert ("delivered", "o-1") == (state["status"], state["client_ref"])

    # Again: the state records the facts, nothing is published twice; then they are removed.
    code, lines = cli(service, "replay", "--reason", reason)
    assert code == 0
    assert [line["outcome"] for line in lines[:-1]] == ["already stored", "already stored"]
    assert published() == (form, multi)
    assert letters(service, "--reason", reason) == []


def test_track_input_replays_when_it_parses_and_stays_when_it_does_not(service: Smsbus) -> None:
    url = service.env["SMSBUS_NATS_URL"]
    good = str(next(_ids))

    async def junk() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(f"{service.prefix}.track.smstower", b"{not json")
        finally:
            await nc.close()

    asyncio.run(junk())
    body = json.dumps({"message_id": good, "phone": "79007654321"}).encode()
    kept(
        service, url, provider="smstower", reason=f"{service.prefix}.track.smstower: refused",
        method=None, path=f"{service.prefix}.track.smstower", query={}, peer=None, body=body,
    )  # fmt: skip
    found = wait_for(
        lambda: (lambda d: d if len(d) == 2 else None)(letters(service, "--provider", "smstower")),
        what="the projector's dead letter and the kept one",
    )
    assert sorted(d["reason"].rsplit(": ", 1)[1] for d in found) == ["body is not JSON", "refused"]
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert letters(service, "--provider", "smstower", "--since", future) == []
    assert len(letters(service, "--provider", "smstower", "--since", "1h")) == 2

    code, lines = cli(service, "replay", "--provider", "smstower")
    assert code == 1
    assert sorted(line["outcome"] for line in lines[:-1]) == ["failed", "replayed"]
    assert lines[-1] == {"summary": True, "replayed": 1, "already": 0, "failed": 1, "skipped": 0}
    state = wait_for(
        lambda: (lambda r: r.json() if r.status_code == 200 else None)(
            httpx.get(f"{service.api}/v1/messages/smstower/{good}")
        ),
        what="the replayed registration",
    )
    assert state["phone"] == "79007654321"
    [left] = letters(service, "--provider", "smstower")
    assert left["reason"].endswith("body is not JSON")


def test_replay_refuses_a_sequence_that_is_not_a_dead_letter(service: Smsbus) -> None:
    code, _ = cli(service, "replay", "999999999")
    assert code == 1
    env = {"PATH": os.environ.get("PATH", ""), **service.env}
    done = subprocess.run(
        [SMSBUS, "replay", "1", "--provider", "smspilot"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and "sequences or filters" in done.stderr
