"""Events larger than the NATS server takes (its `max_payload`, lowered by an operator: 1 MB
by default). Such an event could never be stored; spooled, it would hold back every event after
it for good while `/readyz` said ready. A callback that would make one is refused (`413`) and
kept as a dead letter, cut to fit; one spooled before the server took less leaves the spool as a
dead letter, cut to fit."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import nats

from tests.support import NatsServer, Smsbus, Stored, isolated_env, quiet, read_stream, wait_for

SMALL = "max_payload: 4096\n"


async def _publish(url: str, subject: str, data: bytes) -> None:
    nc = await nats.connect(url, error_cb=quiet)
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


def _stored(server: NatsServer, bus: Smsbus) -> list[tuple[str, str]]:
    """(type, the status event's message id or the dead letter's reason) of each event."""
    found = read_stream(server.url, bus.stream, f"{bus.prefix}.>")
    return [
        (e.event["type"], e.event["data"].get("message_id") or e.event["data"]["reason"])
        for e in found
    ]


def test_a_callback_larger_than_nats_takes_is_refused_and_kept_as_a_dead_letter(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats", config=SMALL).start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus").start()
    try:
        with httpx.Client(base_url=bus.base, timeout=10) as http:
            big = http.get("/callbacks/smspilot",
                           params={"server_id": "1", "status": 2, "ref": "x" * 6000})  # fmt: skip
            assert 413 == big.status_code
            reason = "the event would be 6655 bytes; NATS takes at most 4096 (its max_payload)"
            assert reason == big.text
            for server_id in ("2", "3"):
                answer = http.get("/callbacks/smspilot",
                                  params={"server_id": server_id, "status": 2})  # fmt: skip
                assert (200, "OK") == (answer.status_code, answer.text)
        assert 0 == bus.spool_depth()
        assert [
            ("sms.deadletter", reason),
            ("sms.status", "2"),
            ("sms.status", "3"),
        ] == _stored(server, bus)
        [letter] = read_stream(server.url, bus.stream, f"{bus.prefix}.deadletter.>")
        raw = letter.event["data"]["raw"]  # cut to fit: the value over 64 characters
        assert ({"server_id": "1", "status": "2", "ref": "x" * 64}, True) == (
            raw["query"],
            raw["truncated"],
        )
        assert 1 == bus.metric("smsbus_callbacks_total", outcome="too_large")
        # Junk on the track subject as large as the server takes: its dead letter is larger.
        asyncio.run(_publish(server.url, f"{bus.prefix}.track.smspilot", b"\xff" * 4000))

        def junk() -> list[Stored]:
            found = read_stream(server.url, bus.stream, f"{bus.prefix}.deadletter.>")
            return [e for e in found if e.event["data"]["raw"]["path"].endswith(".track.smspilot")]

        [letter] = wait_for(junk, what="the junk's dead letter")
        raw = letter.event["data"]["raw"]
        assert ("base64", True) == (raw["body_encoding"], raw["truncated"])
        assert 0 < len(base64.b64decode(raw["body"])) < 4000
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()


def test_a_spooled_event_larger_than_nats_now_takes_leaves_the_spool_as_a_dead_letter(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus").start()
    try:
        server.stop()
        with httpx.Client(base_url=bus.base, timeout=10) as http:
            for server_id, ref in (("1", "x"), ("2", "x" * 6000), ("3", "x")):
                params: dict[str, str | int] = {"server_id": server_id, "status": 2, "ref": ref}
                answer = http.get("/callbacks/smspilot", params=params)
                assert (200, "OK") == (answer.status_code, answer.text)  # spooled
        server.config = SMALL  # the server comes back taking less
        server.start()
        wait_for(lambda: bus.spool_depth() == 0, timeout=15, what="the spool to drain")
        stored = _stored(server, bus)
        assert [("sms.status", "1"), ("sms.status", "3")] == stored[:2]
        [(kind, reason)] = stored[2:]
        assert "sms.deadletter" == kind
        assert reason.startswith("spooled status event ")
        assert reason.endswith(
            "refused: the event would be 6655 bytes; NATS takes at most 4096 (its max_payload)"
        )
        [letter] = [e for e in read_stream(server.url, bus.stream, f"{bus.prefix}.deadletter.>")]
        assert letter.event["data"]["raw"]["truncated"] is True
        assert "spooled event larger than NATS takes" in bus.logs()
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()


async def _cap_messages(url: str, stream: str, size: int) -> None:
    """An operator's `nats stream edit --max-msg-size`."""
    nc = await nats.connect(url, error_cb=quiet)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(stream)).config
        config.max_msg_size = size
        await js.update_stream(config)
    finally:
        await nc.close()


def test_the_streams_own_limit_on_a_message_set_under_a_running_smsbus_is_followed(
    tmp_path: Path,
) -> None:
    """The stream's `max_msg_size` lowered by an operator while smsbus runs: within seconds
    a callback too large for it is refused (`413`) with a dead letter; one that came before
    smsbus knew is refused by JetStream, spooled, and leaves the spool as a dead letter. Either
    way the callbacks after it are stored and the spool drains."""
    server = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(server.url), tmp_path / "bus").start()
    try:
        asyncio.run(_cap_messages(server.url, bus.stream, 2048))
        with httpx.Client(base_url=bus.base, timeout=10) as http:
            sent = []

            def refused() -> bool:
                sent.append(str(100 + len(sent)))
                params = {"server_id": sent[-1], "status": 2, "ref": "x" * 3000}
                answer = http.get("/callbacks/smspilot", params=params)
                assert answer.status_code in (200, 413), answer.text
                return answer.status_code == 413

            wait_for(refused, timeout=15, what="a callback refused for the stream's limit")
            assert (
                "NATS takes at most 2048 (the stream's max_msg_size)"
                in http.get(
                    "/callbacks/smspilot",
                    params={"server_id": "99", "status": 2, "ref": "y" * 3000},
                ).text
            )
            answer = http.get("/callbacks/smspilot", params={"server_id": "1", "status": 2})
            assert (200, "OK") == (answer.status_code, answer.text)
        wait_for(lambda: bus.spool_depth() == 0, timeout=15, what="the spool to drain")
        stored = _stored(server, bus)
        assert [("sms.status", "1")] == [item for item in stored if item[0] == "sms.status"]
        letters = [reason for kind, reason in stored if kind == "sms.deadletter"]
        print(f"\n{len(sent)} sent before the first 413; {len(letters)} dead letters")
        assert len(sent) + 1 == len(letters)
        assert all("(the stream's max_msg_size)" in reason for reason in letters)
        assert 0 == bus.stop()
    finally:
        bus.kill()
        server.stop()
