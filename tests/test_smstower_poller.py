"""smsbus polling a fake SMSTOWER (a real HTTP app built from smstower.txt) end to end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from bus.config import load_settings
from bus.core import open_bus
from pollers import engine
from pollers.runner import start_pollers
from pollers.smstower import STATUS
from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, Seen, msk_now
from tests.support import (
    NatsServer,
    Smsbus,
    Stored,
    await_for,
    free_port,
    isolated_env,
    make_pki,
    read_stream,
    wait_for,
)

pytestmark = pytest.mark.slow
_ids = itertools.count(random.randrange(10**8, 10**9))


def new_id() -> str:
    return str(next(_ids))


def env_for(nats: NatsServer, fake: FakeSmstower, url: str, **extra: str) -> dict[str, str]:
    settings = {**fake.settings(url), "SMSBUS_BALANCE_INTERVAL": "2"}
    return isolated_env(nats.url, **(settings | extra))


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeSmstower, str]]:
    tower = FakeSmstower(balance="10654")
    with Served(tower.app) as served:
        yield tower, served.url


@pytest.fixture(scope="module")
def service(
    nats_server: NatsServer,
    fake: tuple[FakeSmstower, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Smsbus]:
    tower, url = fake
    bus = Smsbus(env_for(nats_server, tower, url), tmp_path_factory.mktemp("smstower")).start()
    yield bus
    assert 0 == bus.stop()


def register(bus: Smsbus, *items: dict[str, Any]) -> None:
    response = httpx.post(f"{bus.api}/v1/messages", json=list(items), timeout=10)
    assert 202 == response.status_code, response.text


def events(nats: NatsServer, bus: Smsbus, tail: str) -> list[Stored]:
    """What the stream holds under `<prefix>.<tail>`."""
    return read_stream(nats.url, bus.stream, f"{bus.prefix}.{tail}")


def reports_of(nats: NatsServer, bus: Smsbus, message_id: str) -> list[tuple[str, str]]:
    """The message's status events in the stream: (status, via) of each, in order."""
    return [
        (s.event["data"]["status"], s.event["data"]["via"])
        for s in read_stream(nats.url, bus.stream, f"{bus.prefix}.status.smstower.>")
        if s.event["subject"] == message_id
    ]


def statuses_of(nats: NatsServer, bus: Smsbus, message_id: str) -> list[str]:
    return [status for status, _ in reports_of(nats, bus, message_id)]


def asked_for(tower: FakeSmstower, message_id: str) -> int:
    return sum(message_id in r.form.get("messageid", "").split(",") for r in tower.requests)


def metric(bus: Smsbus, name: str) -> float:
    for line in httpx.get(f"{bus.base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is missing")


def test_statuses_are_polled_batched_and_stop_at_final(
    nats_server: NatsServer, fake: tuple[FakeSmstower, str], service: Smsbus
) -> None:
    tower, _ = fake
    sent, done, unknown = new_id(), new_id(), new_id()
    tower.statuses[sent] = ("processing", "")
    tower.statuses[done] = ("delivered", msk_now())
    register(
        service,
        {"provider": "smstower", "message_id": sent, "client_ref": "r-1", "phone": "79030001122"},
        {"provider": "smstower", "message_id": done},
        {"provider": "smstower", "message_id": unknown},
    )
    wait_for(lambda: statuses_of(nats_server, service, done) == ["delivered"], what="delivered")
    wait_for(lambda: statuses_of(nats_server, service, sent) == ["sent"], what="sent")
    first = next(r for r in tower.seen("/getstatus.v2.php") if sent in r.form["messageid"])
    assert {sent, done, unknown} == set(first.form["messageid"].split(","))
    assert (tower.login, tower.password) == (first.form["login"], first.form["password"])
    assert "" == first.query  # credentials travel in the body only

    tower.statuses[sent] = ("delivered", msk_now())
    wait_for(lambda: statuses_of(nats_server, service, sent) == ["sent", "delivered"], what="final")
    [final] = [
        s for s in events(nats_server, service, "status.smstower.delivered")
        if s.event["subject"] == sent
    ]  # fmt: skip
    assert ("r-1", "79030001122", "poll") == (
        final.event["data"]["client_ref"],
        final.event["data"]["phone"],
        final.event["data"]["via"],
    )
    # Finals are no longer asked for; the unknown id (code 9 when alone) still is.
    settled = asked_for(tower, sent), asked_for(tower, done)
    before = asked_for(tower, unknown)
    wait_for(lambda: asked_for(tower, unknown) >= before + 2, what="the unknown id polled again")
    assert settled == (asked_for(tower, sent), asked_for(tower, done))


def test_many_due_together_go_out_in_batches_of_100(
    fake: tuple[FakeSmstower, str], service: Smsbus
) -> None:
    tower, _ = fake
    ids = [new_id() for _ in range(250)]
    register(service, *({"provider": "smstower", "message_id": i} for i in ids))
    wanted = set(ids)

    def covering() -> list[set[str]]:
        asked = [set(r.form["messageid"].split(",")) for r in tower.seen("/getstatus.v2.php")]
        return [wanted & a for a in asked if wanted & a]

    wait_for(lambda: wanted <= set().union(*covering()), what="all 250 ids polled")
    # Ids are batched as they become due. How many requests the 250 take depends on how fast the
    # registrations reach the poller's mirror on a loaded machine (bench/poll.py counts exactly
    # 1000 requests for 100,000 ids); a request never carries more than 100, and the first
    # batches are full.
    sizes = [len(r.form["messageid"].split(",")) for r in tower.seen("/getstatus.v2.php")]
    assert max(sizes) <= 100
    assert max(map(len, covering())) >= 99


def test_an_expired_message_ends_with_a_final_unknown(
    nats_server: NatsServer, service: Smsbus
) -> None:
    stale = new_id()
    long_ago = (datetime.now(UTC) - timedelta(days=4)).isoformat()
    register(service, {"provider": "smstower", "message_id": stale, "sent_at": long_ago})
    wait_for(lambda: statuses_of(nats_server, service, stale) == ["unknown"], what="expiry")
    [item] = [
        s for s in events(nats_server, service, "status.smstower.unknown")
        if s.event["subject"] == stale
    ]  # fmt: skip
    assert ("expiry", True, "") == (
        item.event["data"]["via"],
        item.event["data"]["final"],
        item.event["data"]["provider_status"],
    )


def test_a_message_is_polled_a_last_time_before_it_expires(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Its `unknown` is published only when the provider has no final status either: one that
    came since its last poll (polls are up to SMSBUS_<P>_MAX_INTERVAL apart), or that of a
    message registered after its TTL had passed (a late registration, a backfill), which was
    never polled, is published in its place."""
    tower = FakeSmstower()
    ttl = 600.0
    late, gone, turned, still = (new_id() for _ in range(4))
    tower.statuses[late] = ("delivered", msk_now(-3 * 86400))
    tower.statuses.update({turned: ("processing", ""), still: ("processing", "")})

    def track(message_id: str, sent_at: datetime) -> dict[str, str]:
        return {"provider": "smstower", "message_id": message_id, "sent_at": sent_at.isoformat()}

    def via(message_id: str) -> list[tuple[str, str]]:
        return reports_of(nats_server, bus, message_id)

    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="3",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="30", SMSBUS_TRACK_TTL=str(ttl))  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            long_ago = datetime.now(UTC) - timedelta(days=4)
            register(bus, *(track(m, long_ago) for m in (late, gone)))
            wait_for(lambda: via(gone), what="the unknown of one the provider does not know")
            assert ([("delivered", "poll")], [("unknown", "expiry")]) == (via(late), via(gone))

            # Polled 3 s after the registration, then 3 s later; expired 5.5 s after it.
            ending = datetime.now(UTC) - timedelta(seconds=ttl - 5.5)
            register(bus, *(track(m, ending) for m in (turned, still)))
            wait_for(lambda: via(turned), what="the first poll")
            tower.statuses[turned] = ("delivered", msk_now())  # before its TTL, after that poll
            wait_for(lambda: len(via(still)) == 2, what="the unknown of the other")
            assert [("sent", "poll"), ("unknown", "expiry")] == via(still)
            assert [("sent", "poll"), ("delivered", "poll")] == via(turned)
            assert 2 == bus.metric("smsbus_expired_total", provider="smstower")
        finally:
            assert 0 == bus.stop()


def test_a_last_look_waits_for_a_provider_that_is_failing_for_a_while(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A message whose tracking ends while its provider cannot answer about it (its status
    method down, the back-off after a failure) waits for the answer rather than getting
    `unknown` at once, for up to twice SMSBUS_<P>_MAX_INTERVAL from the first look missed;
    past that it expires as it is."""
    tower = FakeSmstower(down={STATUS})
    late, gone, waited = new_id(), new_id(), new_id()
    tower.statuses.update({late: ("delivered", msk_now(-86400)), waited: ("delivered", "")})

    def via(message_id: str) -> list[tuple[str, str]]:
        return reports_of(nats_server, bus, message_id)

    long_ago = (datetime.now(UTC) - timedelta(days=4)).isoformat()
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="0.5",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="4")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            register(bus, *({"provider": "smstower", "message_id": m, "sent_at": long_ago}
                            for m in (late, gone)))  # fmt: skip
            wait_for(lambda: asked_for(tower, late) >= 2, what="two looks missed")
            assert ([], []) == (via(late), via(gone))
            tower.down.clear()  # the provider answers again
            wait_for(lambda: via(gone), what="the unknown of the one it does not know")
            assert ([("delivered", "poll")], [("unknown", "expiry")]) == (via(late), via(gone))

            tower.down.add(STATUS)  # and is down for longer
            register(bus, {"provider": "smstower", "message_id": waited, "sent_at": long_ago})
            wait_for(lambda: asked_for(tower, waited) >= 1, what="its look missed")
            missed = time.monotonic()
            wait_for(lambda: via(waited), timeout=20, what="its expiry")
            assert [("unknown", "expiry")] == via(waited)
            assert time.monotonic() - missed >= 2 * 4 - 0.5
            assert asked_for(tower, waited) >= 3  # looked for all along
        finally:
            assert 0 == bus.stop()


@pytest.mark.parametrize("failing", ["gateway down", "credentials refused"])
def test_a_message_ends_while_the_whole_provider_fails(
    nats_server: NatsServer, tmp_path: Path, failing: str
) -> None:
    """Every method failing fast (code 10 from each, or the password refused): the status loop
    takes its turn at each back-off's end beside the inbound poll, whose failure would otherwise
    back the provider off again before the status loop's next tick. So a message whose tracking
    ends is looked at, waits its twice SMSBUS_<P>_MAX_INTERVAL and expires at the next turn
    after that; an outage or refused credentials do not keep it open for as long as they last."""
    tower = FakeSmstower(mode="code10" if failing == "gateway down" else None)
    ending = new_id()
    long_ago = (datetime.now(UTC) - timedelta(days=4)).isoformat()
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="1",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="4", SMSBUS_BALANCE_INTERVAL="600")  # fmt: skip
        if failing == "credentials refused":
            env["SMSBUS_SMSTOWER_PASSWORD"] = "not-the-password"
        bus = Smsbus(env, tmp_path).start()
        try:
            register(bus, {"provider": "smstower", "message_id": ending, "sent_at": long_ago})
            wait_for(lambda: asked_for(tower, ending), what="its first look")
            looked = time.monotonic()
            wait_for(lambda: bus.metric("smsbus_expired_total", provider="smstower"),
                     timeout=30, what="its expiry")  # fmt: skip
            took = time.monotonic() - looked
            assert [("unknown", "expiry")] == reports_of(nats_server, bus, ending)
            # Twice the max interval, then a back-off of at most the max interval.
            # (Before the status loop woke at a back-off's end: 18.5 and 20.5 s, gaps of 8.5 s.)
            assert 2 * 4 - 0.5 <= took <= 2 * 4 + 4 + 2.5, f"expired {took:.1f} s after"
            looks = [r.at for r in tower.seen(STATUS)]
            assert max(b - a for a, b in itertools.pairwise(looks)) <= 4 + 2
        finally:
            assert 0 == bus.stop()


def test_inbound_sms_are_published_once(
    nats_server: NatsServer, fake: tuple[FakeSmstower, str], service: Smsbus
) -> None:
    tower, _ = fake
    first, second = new_id(), new_id()
    tower.inbound.append(
        {
            "id": first,
            "from": "79030001122",
            "to": "79030001133",
            "text": "Привет",
            "created": msk_now(-60),
        }
    )
    tower.inbound.append(
        {
            "id": second,
            "from": "79030001144",
            "to": "79030001133",
            "text": "STOP",
            "created": msk_now(-1),
        }
    )

    def inbound_ids() -> list[str]:
        return [
            s.event["data"]["message_id"] for s in events(nats_server, service, "inbound.smstower")
        ]

    wait_for(lambda: {first, second} <= set(inbound_ids()), what="both inbound SMS")
    published = metric(service, 'smsbus_events_published_total{provider="smstower",type="inbound"}')
    polls = len(tower.seen("/incomingsms.php"))
    wait_for(lambda: len(tower.seen("/incomingsms.php")) >= polls + 3, what="three more polls")
    # Seen again in the overlap, yet never published again: not even a deduplicated publish.
    assert published == metric(
        service, 'smsbus_events_published_total{provider="smstower",type="inbound"}'
    )
    event = next(
        s.event
        for s in events(nats_server, service, "inbound.smstower")
        if s.event["subject"] == first
    )
    assert ("79030001122", "79030001133", "Привет") == (
        event["data"]["from"],
        event["data"]["to"],
        event["data"]["text"],
    )


def test_balance_is_read_and_exported(
    nats_server: NatsServer, fake: tuple[FakeSmstower, str], service: Smsbus
) -> None:
    readings = wait_for(
        lambda: events(nats_server, service, "balance.smstower"), what="a balance reading"
    )
    assert ("10654", "SMS", "smstower") == (
        readings[0].event["data"]["balance"],
        readings[0].event["data"]["unit"],
        readings[0].event["data"]["provider"],
    )
    assert 10654 == metric(service, 'smsbus_provider_balance{provider="smstower",unit="SMS"}')
    ready = httpx.get(f"{service.base}/readyz", timeout=5).json()["providers"]["smstower"]
    assert (True, True) == (ready["enabled"], ready["leader"])
    assert ready["last_success"] is not None


def test_password_never_appears_in_logs(fake: tuple[FakeSmstower, str], service: Smsbus) -> None:
    tower, _ = fake
    assert tower.password not in service.logs()


@pytest.mark.parametrize("mode", ["garbage", "truncated", "xxe", "billion"])
def test_hostile_answers_are_dead_lettered_and_polling_recovers(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    tower = FakeSmstower(mode=mode)
    with Served(tower.app) as served:
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path).start()
        try:
            letters = wait_for(
                lambda: events(nats_server, bus, "deadletter.smstower"), what="a dead letter"
            )
            data = letters[0].event["data"]
            assert (None, served.url) == (data["raw"]["method"], data["raw"]["path"])
            assert tower.password not in str(letters[0].event)
            started = time.monotonic()
            assert 200 == httpx.get(f"{bus.base}/healthz", timeout=5).status_code
            assert time.monotonic() - started < 1
            assert (
                metric(bus, 'smsbus_poll_requests_total{outcome="bad_answer",provider="smstower"}')
                >= 1
            )
            tower.mode = None
            wait_for(
                lambda: events(nats_server, bus, "balance.smstower"), timeout=20, what="recovery"
            )
        finally:
            assert 0 == bus.stop()


def test_a_row_that_cannot_be_read_holds_back_none_of_the_ids_batched_with_it(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """One message's row comes without its status: the ids batched with it are asked about
    again in halves, down to that one, and their statuses published; its answer is a dead
    letter, it stays tracked, and its status is published once its row can be read. When every
    row is unreadable, the ids are not asked about one by one: the batch fails as a whole."""
    tower = FakeSmstower()
    ids = [new_id() for _ in range(40)]
    poison = ids[17]
    tower.statuses.update({i: ("delivered", msk_now()) for i in ids})
    tower.unreadable.add(poison)

    def delivered(among: list[str]) -> set[str]:
        found = events(nats_server, bus, "status.smstower.delivered")
        return {s.event["subject"] for s in found} & set(among)

    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="1",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="2")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            register(bus, *({"provider": "smstower", "message_id": i} for i in ids))
            wait_for(lambda: delivered(ids) == set(ids) - {poison}, what="the 39 others read")
            # Each id asked about at most once per halving (40 ids: 6 levels) and the whole.
            assert max(asked_for(tower, i) for i in ids if i != poison) <= 1 + 6
            assert 2 == asked_for(tower, ids[-1])  # the half read at once
            [letter] = wait_for(
                lambda: events(nats_server, bus, "deadletter.smstower"), what="a dead letter"
            )
            asked = asked_for(tower, poison)
            wait_for(lambda: asked_for(tower, poison) >= asked + 2, what="two more polls of it")
            assert [letter] == events(nats_server, bus, "deadletter.smstower")  # told once
            data = letter.event["data"]
            assert "a message lacks idMessage or deliveryStatus" in data["reason"]
            assert f"<idMessage>{poison}</idMessage>" in data["raw"]["body"]
            assert poison not in delivered(ids)
            shown = bus.readyz()["providers"]["smstower"]
            assert "deliveryStatus" in shown["last_error"] and shown["last_success"]
            tower.unreadable.clear()
            wait_for(lambda: poison in delivered(ids), what="its status, once readable")
            assert 1 == len(statuses_of(nats_server, bus, poison))

            # Every row unreadable: not one id's fault; the batch fails as a whole.
            others = [new_id() for _ in range(40)]
            tower.statuses.update({i: ("delivered", msk_now()) for i in others})
            tower.unreadable.update(others)
            register(bus, *({"provider": "smstower", "message_id": i} for i in others))
            letters = len(events(nats_server, bus, "deadletter.smstower"))
            wait_for(
                lambda: len(events(nats_server, bus, "deadletter.smstower")) >= letters + 2,
                what="two failed polls",
            )
            asked = [
                set(r.form["messageid"].split(",")) & set(others)
                for r in tower.seen("/getstatus.v2.php")
            ]
            assert min(len(a) for a in asked if a) >= 20  # the batch, or one of its halves
            assert set() == delivered(others)
        finally:
            assert 0 == bus.stop()


def test_an_id_whose_row_cannot_be_read_is_asked_about_alone_from_then_on(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Found once by halving its batch, an id whose row cannot be read is asked about alone at
    its next polls (one request, not the halving again: up to 15 for 100 ids, at every poll
    while the row lasts, for up to SMSBUS_TRACK_TTL), the others batched without it; once its
    row can be read it is batched again."""
    tower = FakeSmstower()
    ids = [new_id() for _ in range(30)]
    poison = ids[11]
    tower.statuses.update({i: ("processing", "") for i in ids})
    tower.unreadable.add(poison)

    def asking() -> list[set[str]]:
        return [set(r.form["messageid"].split(",")) for r in tower.seen("/getstatus.v2.php")]

    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="0.5",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="1")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            register(bus, *({"provider": "smstower", "message_id": i} for i in ids))
            wait_for(lambda: events(nats_server, bus, "deadletter.smstower"), what="its letter")
            first, polls = len(asking()), asked_for(tower, poison)
            assert {poison} in asking()  # found by halving
            wait_for(lambda: asked_for(tower, poison) >= polls + 3, what="three more polls of it")
            later = asking()[first:]
            assert all(a == {poison} for a in later if poison in a)
            assert any(a == set(ids) - {poison} for a in later)  # the others, batched
            tower.unreadable.clear()
            wait_for(lambda: statuses_of(nats_server, bus, poison), what="its status")
            asked = len(asking())
            wait_for(lambda: any(a == set(ids) for a in asking()[asked:]), timeout=5,
                     what="the id batched with the others again")  # fmt: skip
            assert 1 == len(events(nats_server, bus, "deadletter.smstower"))
        finally:
            assert 0 == bus.stop()


def test_an_inbound_row_that_cannot_be_read_is_set_aside_and_holds_back_no_other(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Inbound SMS are listed by date: a row that failed the whole answer would fail every poll
    while it stays in the window, and every SMS after it with it. It is set aside (a dead
    letter, once, though the overlap lists it again), the others are published, and the window
    moves on."""
    tower = FakeSmstower()
    sms = [
        {"id": new_id(), "from": "79030001122", "to": "79030001133", "text": t,
         "created": msk_now(-10)}
        for t in ("до", "без номера", "после")
    ]  # fmt: skip
    sms[1]["id"] = ""  # no idMessage
    tower.inbound.extend(sms)

    def inbound() -> list[str]:
        return [s.event["data"]["text"] for s in events(nats_server, bus, "inbound.smstower")]

    with Served(tower.app) as served:
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path).start()
        try:
            wait_for(lambda: ["до", "после"] == sorted(inbound()), what="the two readable SMS")
            polls = len(tower.seen("/incomingsms.php"))
            wait_for(lambda: len(tower.seen("/incomingsms.php")) >= polls + 3, what="3 more polls")
            [letter] = events(nats_server, bus, "deadletter.smstower")
            assert "an inbound message lacks idMessage" == letter.event["data"]["reason"]
            assert "без номера" in letter.event["data"]["raw"]["body"]
            later = {"id": new_id(), "from": "79030001144", "to": "79030001133", "text": "ещё",
                     "created": msk_now(-1)}  # fmt: skip
            tower.inbound.append(later)
            wait_for(lambda: "ещё" in inbound(), what="an SMS after it")
            assert 3 == len(inbound())
        finally:
            assert 0 == bus.stop()


def test_an_inbound_list_none_of_whose_rows_can_be_read_holds_its_window_and_no_poll_back(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """On an account that receives few SMS, one that cannot be read may be alone in its window
    for days. Failing the inbound call for it backed off every call to the provider, status
    polls too, doubling up to SMSBUS_SMSTOWER_MAX_INTERVAL, until some readable SMS came. The
    list is read like any other: the row is told once, status polls keep their pace, and the
    window does not move (no cursor is saved), so the SMS is still found, an hour after it came,
    once its row can be read (as after a release that reads it)."""
    tower = FakeSmstower()
    alone = {"id": "", "from": "79030001122", "to": "79030001133", "text": "одна",
             "created": msk_now(-3600)}  # fmt: skip
    tower.inbound.append(alone)
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_MAX_INTERVAL="30")
        bus = Smsbus(env, tmp_path).start()
        try:
            wait_for(lambda: events(nats_server, bus, "deadletter.smstower"), what="its letter")
            polls = len(tower.seen("/incomingsms.php"))
            wait_for(lambda: len(tower.seen("/incomingsms.php")) >= polls + 4, timeout=15,
                     what="four more polls of the inbound list")  # fmt: skip
            [letter] = events(nats_server, bus, "deadletter.smstower")
            assert "an inbound message lacks idMessage" == letter.event["data"]["reason"]
            assert "provider call failed" not in bus.logs()
            bad = 'smsbus_poll_requests_total{outcome="bad_answer",provider="smstower"}'
            assert 1 == metric(bus, bad)
            assert 1 == metric(bus, 'smsbus_provider_up{provider="smstower"}')
            waiting = new_id()
            tower.statuses[waiting] = ("delivered", msk_now())
            register(bus, {"provider": "smstower", "message_id": waiting})
            wait_for(lambda: statuses_of(nats_server, bus, waiting), timeout=5,
                     what="a status polled at its interval")  # fmt: skip
            alone["id"] = new_id()  # its row can be read now
            wait_for(lambda: events(nats_server, bus, "inbound.smstower"), what="the SMS")
            [sms] = events(nats_server, bus, "inbound.smstower")
            assert ("одна", alone["id"]) == (sms.event["data"]["text"], sms.event["subject"])
        finally:
            assert 0 == bus.stop()


def test_an_inbound_list_of_more_unreadable_rows_than_one_bad_sms_explains_fails(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A thousand and one SMS that cannot be read are not a thousand and one bad rows but an
    answer whose form has changed: its poll fails (one dead letter a poll, backed off) with the
    window held, rather than a dead letter for each row, again at every poll once there are
    more than smsbus remembers having told of; once they can be read, every one is published."""
    tower = FakeSmstower()
    tower.inbound.extend(
        {"id": "", "from": "79030001122", "to": "79030001133", "text": f"sms {n}",
         "created": msk_now(-600)}
        for n in range(1001)
    )  # fmt: skip
    with Served(tower.app) as served:
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path).start()
        try:
            wait_for(lambda: len(tower.seen("/incomingsms.php")) >= 3, what="three polls")
            letters = events(nats_server, bus, "deadletter.smstower")
            assert 1 <= len(letters) <= len(tower.seen("/incomingsms.php"))
            assert "1001 inbound rows cannot be read" in letters[0].event["data"]["reason"]
            assert "provider call failed" in bus.logs()
            assert [] == events(nats_server, bus, "inbound.smstower")
            for sms in tower.inbound:  # as a release that reads the new form would
                sms["id"] = new_id()
            wait_for(lambda: len(events(nats_server, bus, "inbound.smstower")) == 1001,
                     timeout=30, what="every SMS of the window held")  # fmt: skip
        finally:
            assert 0 == bus.stop()


def test_an_auth_failure_shows_backs_off_and_a_rotated_secret_file_is_used(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A password fixed at the provider and in the Kubernetes Secret is used at the next call:
    smsbus reads the `*_FILE` again after the provider refuses it, without a restart, and backs
    off by the one rule (interval, doubling to the max), not for minutes."""
    tower = FakeSmstower()
    secret = tmp_path / "password"
    secret.write_text("wrong-password\n")
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_PASSWORD_FILE=str(secret),
                      SMSBUS_SMSTOWER_INTERVAL="0.5", SMSBUS_SMSTOWER_MAX_INTERVAL="2")  # fmt: skip
        del env["SMSBUS_SMSTOWER_PASSWORD"]
        bus = Smsbus(env, tmp_path / "bus").start()
        try:

            def failing() -> dict[str, Any] | None:
                body = httpx.get(f"{bus.base}/readyz", timeout=5).json()["providers"]["smstower"]
                return body if body["last_error"] else None

            state = wait_for(failing, what="the auth failure in /readyz")
            assert "auth_error: code 4: wrong login or password" in state["last_error"]
            assert 0 == metric(bus, 'smsbus_provider_up{provider="smstower"}')
            wait_for(lambda: len(tower.requests) >= 4, what="calls going on, backing off")
            gaps = [b.at - a.at for a, b in itertools.pairwise(tower.requests)]
            # SMSBUS_SMSTOWER_MAX_INTERVAL, plus a loop's turn (0.125 s) and the failed call's
            # own time on a busy machine (2.505 s seen in CI); doubling past it would be 4 s.
            assert max(gaps) <= 2 + 1.0
            secret.write_text(f"{tower.password}\n")  # the Secret rotated
            wait_for(lambda: metric(bus, 'smsbus_provider_up{provider="smstower"}') == 1,
                     timeout=10, what="the rotated password to be used")  # fmt: skip
            assert "wrong-password" not in bus.logs() and tower.password not in bus.logs()
        finally:
            assert 0 == bus.stop()


def test_a_rate_limited_gateway_is_asked_again_no_sooner_than_its_retry_after(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A gateway's rate limit (429, Retry-After: 3) is waited out, not hit again at the next
    interval (0.3 s here); then polling goes on as before."""
    tower = FakeSmstower(mode="http429", retry_after="3")
    with Served(tower.app) as served:
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path).start()
        try:
            first = wait_for(lambda: tower.requests, what="a first call")[0]
            at_start = first.at + 0.1  # the inbound poll and the balance reading, together

            def next_call() -> list[Seen]:
                return [r for r in list(tower.requests) if r.at > at_start]

            gap = wait_for(next_call, what="the next call")[0].at - first.at
            assert gap >= 2.9, f"asked again {gap:.2f} s after"
            error = bus.readyz()["providers"]["smstower"]["last_error"]
            assert "answered HTTP 429, retry after 3 s" in error
            tower.mode = None
            wait_for(lambda: bus.metric("smsbus_provider_up", provider="smstower") == 1,
                     what="polling again")  # fmt: skip
        finally:
            assert 0 == bus.stop()


def test_a_provider_whose_certificate_is_not_trusted_says_so(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """An HTTPS gateway whose certificate no trusted CA signed (a TLS-inspecting proxy, a wrong
    host): /readyz and the log say the certificate failed, not only that a connection did."""
    tower = FakeSmstower()
    pki = make_pki(tmp_path / "pki")
    with Served(tower.app, tls=pki.server) as served:
        assert served.url.startswith("https://")
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path / "bus").start()
        try:
            error = wait_for(lambda: bus.readyz()["providers"]["smstower"]["last_error"],
                             what="the failure in /readyz")  # fmt: skip
            assert f"unavailable: cannot reach {served.url}/" in error
            assert "ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED]" in error
            assert "CERTIFICATE_VERIFY_FAILED" in bus.logs()
            assert tower.password not in bus.logs() and not tower.requests
        finally:
            assert 0 == bus.stop()
        # Its CA trusted (SSL_CERT_FILE, as for a proxy that inspects TLS): polled.
        env = env_for(nats_server, tower, served.url, SSL_CERT_FILE=str(pki.ca))
        bus = Smsbus(env, tmp_path / "trusting").start()
        try:
            wait_for(lambda: bus.metric("smsbus_provider_up", provider="smstower") == 1,
                     what="the provider reached")  # fmt: skip
            assert tower.requests
        finally:
            assert 0 == bus.stop()


def test_a_provider_that_moved_says_where_and_its_redirect_is_not_followed(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A 301 to another host: not followed (the credentials are in the body), not a dead letter
    of its HTML page, but an unavailable provider whose error says where it went."""
    tower = FakeSmstower(mode="http301")
    with Served(tower.app) as served:
        bus = Smsbus(env_for(nats_server, tower, served.url), tmp_path).start()
        try:
            error = wait_for(lambda: bus.readyz()["providers"]["smstower"]["last_error"],
                             what="the failure in /readyz")  # fmt: skip
            assert "unavailable: " in error
            assert "answered HTTP 301, moved to https://api.smstower.example/" in error
            assert "SMSBUS_<P>_URL" in error
            assert 0 == bus.metric("smsbus_deadletters_total", provider="smstower")
        finally:
            assert 0 == bus.stop()


def test_a_poller_loop_stuck_on_one_round_is_restarted_counted_and_shown(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop that does not come back from one job (here a provider whose answers hang, and the
    limit lowered from 30 minutes to 1.5 s) is not left in silence behind the lease's renewals:
    the poller's term ends, its lease is given back, and the supervisor starts it again, counted
    in smsbus_task_restarts_total and shown in /readyz's tasks; once the provider answers,
    polling goes on."""
    monkeypatch.setattr(engine, "STALLED_AFTER", 1.5)
    tower = FakeSmstower(mode="stall", stall_s=8.0)

    async def scenario(url: str) -> None:
        env = env_for(nats_server, tower, url, SMSBUS_LEASE_TTL="2",
                      SMSBUS_DATA_DIR=str(tmp_path))  # fmt: skip
        async with open_bus(load_settings(env)) as bus, contextlib.AsyncExitStack() as stack:
            await start_pollers(bus, stack)
            poller = bus.supervisor.statuses()["poller-smstower"]
            await await_for(lambda: _true(poller.restarts >= 1), what="the restart")
            assert poller.last_error is not None
            assert re.fullmatch(
                r"smstower's (inbound|balance) loop has been on one round for \d+ s",
                poller.last_error,
            ), poller.last_error
            restarts = bus.metrics.registry.get_sample_value(
                "smsbus_task_restarts_total", {"task": "poller-smstower"}
            )
            assert restarts is not None and restarts >= 1
            tower.mode = None
            up = "smsbus_provider_up"
            await await_for(
                lambda: _true(bus.metrics.registry.get_sample_value(up, {"provider": "smstower"})
                              == 1),
                timeout=20, what="polling again",
            )  # fmt: skip

    with Served(tower.app) as served:
        asyncio.run(scenario(served.url))


async def _true(value: bool) -> bool:
    return value


def eight_batches_delivered(tower: FakeSmstower) -> list[str]:
    """800 new ids, delivered at the fake: a round's eight status requests of 100."""
    ids = [new_id() for _ in range(800)]
    tower.statuses.update((i, ("delivered", msk_now())) for i in ids)
    return ids


def every_status_stored_once(
    nats_server: NatsServer, bus: Smsbus, count: int, status: str = "delivered", before: int = 0
) -> None:
    """`count` SMSTOWER status events published after `before` others, and `count` of `status`
    in the stream."""
    wait_for(lambda: bus.metric("smsbus_events_published_total", provider="smstower",
                                type="status") >= before + count,
             timeout=30, what=f"every {status} status")  # fmt: skip
    assert count == len(events(nats_server, bus, f"status.smstower.{status}"))


def test_requests_in_flight_that_fail_together_back_off_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The gateway goes away for a moment while eight status requests are in flight: the next
    call follows one interval's back-off, not eight doublings of it (which would stop polling
    for up to SMSBUS_SMSTOWER_MAX_INTERVAL), and every status then comes in."""
    tower = FakeSmstower()
    ids = eight_batches_delivered(tower)
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="1",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="60", SMSBUS_BALANCE_INTERVAL="600")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            wait_for(lambda: tower.seen("/incomingsms.php"), what="the first inbound poll")
            tower.blip = 8
            before = len(tower.requests)
            register(bus, *({"provider": "smstower", "message_id": i} for i in ids))
            wait_for(lambda: len(tower.requests) >= before + 8, what="requests in the blip")
            failed = tower.requests[before : before + 8]
            assert sum(r.path == "/getstatus.v2.php" for r in failed) >= 7
            ended = wait_for(lambda: tower.blip_ended_at, timeout=5, what="the gateway back")

            def next_call() -> list[Seen]:  # one made once the failures were known
                return [r for r in list(tower.requests) if r.at > ended + 0.3]

            back = wait_for(next_call, timeout=20, what="the next call")[0]
            # One failure's back-off is drawn from 0.5 to 1 s; eight doublings, 30 to 60 s.
            assert back.at - ended < 5
            every_status_stored_once(nats_server, bus, len(ids))
            unavailable = 'smsbus_poll_requests_total{outcome="unavailable",provider="smstower"}'
            assert 8 == metric(bus, unavailable)
        finally:
            assert 0 == bus.stop()


@pytest.mark.parametrize("mode", ["http429", "maintenance"])
def test_a_failing_gateway_gets_one_status_request_at_each_back_off_end(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    """800 messages due while the gateway rate-limits every call (429, Retry-After: 1), or
    answers each with its maintenance page (200, HTML): at the end of each wait one status
    request asks whether it answers again, not the eight batches at once, which would meet the
    limit eight times; once it answers, all eight go again. A maintenance page is a provider
    that is down, said with its title, not a bad answer kept as a dead letter at each call."""
    tower = FakeSmstower(mode=mode, retry_after="1")
    ids = eight_batches_delivered(tower)
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="1",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="2", SMSBUS_BALANCE_INTERVAL="600")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            wait_for(lambda: bus.metric("smsbus_provider_up", provider="smstower") == 0,
                     what="the first refusal")  # fmt: skip
            register(bus, *({"provider": "smstower", "message_id": i} for i in ids))
            wait_for(lambda: len(tower.seen(STATUS)) >= 4, timeout=20, what="four back-off ends")
            bursts: list[list[Seen]] = []
            for seen in tower.seen(STATUS):
                if bursts and seen.at - bursts[-1][-1].at < 0.5:
                    bursts[-1].append(seen)
                else:
                    bursts.append([seen])
            # Before: [8, 8, ...], each batch at each end.
            assert [1] * len(bursts) == [len(b) for b in bursts]
            if mode == "maintenance":  # before: "bad_answer: ... XMLSyntaxError", dead letters
                error = bus.readyz()["providers"]["smstower"]["last_error"]
                assert "unavailable: " in error
                assert "web page titled 'SMSTOWER — технические работы'" in error
                assert 0 == bus.metric("smsbus_deadletters_total", provider="smstower")

            tower.stall_s, tower.mode = 0.5, "stall"  # it answers again, each call in 0.5 s
            every_status_stored_once(nats_server, bus, len(ids))
            # The seven others asked together once the one that asked first was answered.
            together = [r.at for r in tower.seen(STATUS)[-7:]]
            assert max(together) - min(together) < 0.4
        finally:
            assert 0 == bus.stop()


def test_a_batch_whose_answer_cannot_be_read_holds_back_no_other_batch(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A batch whose every row is unreadable fails at each poll (a bad answer), while the
    gateway answers the other batches: their statuses come in at every poll all along. A bad
    answer is not a provider that is down, so the status requests do not go one at a time
    behind it, where the failing batch, asked first, would keep the others waiting."""
    tower = FakeSmstower()
    bad = [new_id() for _ in range(100)]
    good = [new_id() for _ in range(100)]
    tower.statuses.update((i, ("processing", msk_now())) for i in bad + good)
    tower.unreadable.update(bad)
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_SMSTOWER_INTERVAL="1",
                      SMSBUS_SMSTOWER_MAX_INTERVAL="2", SMSBUS_BALANCE_INTERVAL="600")  # fmt: skip
        bus = Smsbus(env, tmp_path).start()
        try:
            register(bus, *({"provider": "smstower", "message_id": i} for i in bad))
            wait_for(lambda: events(nats_server, bus, "deadletter.smstower"), what="a bad answer")
            register(bus, *({"provider": "smstower", "message_id": i} for i in good))
            every_status_stored_once(nats_server, bus, len(good), "sent")
            tower.statuses.update((i, ("delivered", msk_now())) for i in good)
            every_status_stored_once(nats_server, bus, len(good), "delivered", before=len(good))
            assert {i for i in bad if asked_for(tower, i) >= 3} == set(bad)  # failing all along
            assert [] == [e for e in events(nats_server, bus, "status.smstower.>")
                          if e.event["subject"] in bad]  # fmt: skip
        finally:
            assert 0 == bus.stop()


def test_tracking_and_cursors_survive_a_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    tower = FakeSmstower()
    waiting = new_id()
    inbound = new_id()
    tower.inbound.append(
        {"id": inbound, "from": "79030001122", "to": "7903", "text": "hi", "created": msk_now(-5)}
    )
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url)
        bus = Smsbus(env, tmp_path).start()
        register(bus, {"provider": "smstower", "message_id": waiting})
        wait_for(lambda: asked_for(tower, waiting) >= 1, what="the first poll")
        wait_for(lambda: events(nats_server, bus, "inbound.smstower"), what="the inbound SMS")
        assert 0 == bus.stop()

        bus = Smsbus(env, tmp_path).start()
        try:
            before = asked_for(tower, waiting)
            wait_for(lambda: asked_for(tower, waiting) > before, what="polling after restart")
            polls = len(tower.seen("/incomingsms.php"))
            wait_for(lambda: len(tower.seen("/incomingsms.php")) > polls, what="an inbound poll")
            assert 0 == metric(
                bus, 'smsbus_events_published_total{provider="smstower",type="inbound"}'
            )
        finally:
            assert 0 == bus.stop()


def test_messages_in_flight_when_the_lease_is_lost_are_polled_by_the_next_term(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The lease goes (taken by another holder, as after a NATS pause) while a batch waits for
    the provider: the batch is cancelled, and its messages must be polled again once this
    replica leads again, not left out of the schedule for good."""
    tower = FakeSmstower(stall_s=30)
    message_id = new_id()
    tower.statuses[message_id] = ("delivered", msk_now(-1))
    with Served(tower.app) as served:
        env = env_for(nats_server, tower, served.url, SMSBUS_LEASE_TTL="2")
        bus = Smsbus(env, tmp_path).start()
        try:
            tower.mode = "stall"
            register(bus, {"provider": "smstower", "message_id": message_id})
            wait_for(lambda: asked_for(tower, message_id) >= 1, what="the poll that hangs")
            tower.mode = None  # only the request already made hangs
            asyncio.run(_take_lease(nats_server.url, f"{bus.stream}_leases", "smstower"))
            hung = asked_for(tower, message_id)
            wait_for(lambda: "lease lost; polling stops here" in bus.logs(), what="the lease lost")
            wait_for(
                lambda: "delivered" in statuses_of(nats_server, bus, message_id),
                timeout=15,
                what="the message polled by the next term",
            )
            assert asked_for(tower, message_id) > hung
        finally:
            assert 0 == bus.stop()


async def _take_lease(url: str, bucket: str, key: str) -> None:
    """Write the lease as another holder would; the bucket's max age then lets it go."""
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        await kv.put(key, b"another-replica")
    finally:
        await nc.close()


@pytest.mark.parametrize("mode", ["http500", "code10", "stall", "down"])
def test_an_unavailable_provider_backs_off_and_callbacks_stay_fast(
    nats_server: NatsServer, tmp_path: Path, mode: str
) -> None:
    tower = FakeSmstower(mode=None if mode == "down" else mode)
    with Served(tower.app) as served:
        url = f"http://127.0.0.1:{free_port()}" if mode == "down" else served.url
        bus = Smsbus(env_for(nats_server, tower, url), tmp_path).start()
        try:
            register(bus, {"provider": "smstower", "message_id": new_id()})
            unavailable = 'smsbus_poll_requests_total{outcome="unavailable",provider="smstower"}'
            wait_for(lambda: metric(bus, unavailable) >= 1, timeout=20, what="a failed call")
            assert 0 == metric(bus, 'smsbus_provider_up{provider="smstower"}')
            ready = httpx.get(f"{bus.base}/readyz", timeout=5).json()["providers"]["smstower"]
            assert "unavailable" in ready["last_error"]
            assert tower.password not in ready["last_error"]
            started = time.monotonic()
            response = httpx.get(
                f"{bus.base}/callbacks/smspilot", params={"server_id": new_id(), "status": 2}
            )
            assert ("OK", True) == (response.text, time.monotonic() - started < 1)
            if mode in ("http500", "code10"):
                calls = len(tower.requests)
                tower.mode = None
                wait_for(lambda: metric(bus, 'smsbus_provider_up{provider="smstower"}') == 1,
                         timeout=20, what="recovery")  # fmt: skip
                assert len(tower.requests) > calls
        finally:
            assert 0 == bus.stop()
