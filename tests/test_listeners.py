"""Only the callback faces the network: which route each listener serves, that nothing public
shows a tracked message, and that a flood of junk from one peer stores a bounded number of dead
letters while good callbacks stay fast."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bus.config import load_settings
from bus.core import open_bus
from receiver.app import create_apps
from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

_ids = itertools.count(random.randrange(10**9, 10**10))

# Which listener serves what: adding a route to the wrong one fails here.
PUBLIC = {
    ("GET", "/callbacks/smspilot"),
    ("POST", "/callbacks/smspilot"),
    ("GET", "/callbacks/smspilot/{token}"),
    ("POST", "/callbacks/smspilot/{token}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}
PRIVATE = {
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages/{provider}/{message_id}"),
    ("GET", "/openapi.json"),
    ("GET", "/healthz"),
}
PHONE, CLIENT_REF = "79035551234", "order-secret-4711"


def test_each_route_is_on_its_listener(nats_server: NatsServer, tmp_path: Path) -> None:
    async def routes() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        env = isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path))
        async with open_bus(load_settings(env)) as bus:
            apps = create_apps(bus)
            return set(apps.public.routes), set(apps.private.routes)

    assert (PUBLIC, PRIVATE) == asyncio.run(routes())


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    env = isolated_env(nats_server.url, SMSBUS_DEADLETTER_RATE="60")
    bus = Smsbus(env, tmp_path_factory.mktemp("listeners")).start()
    yield bus
    assert 0 == bus.stop()


def concrete(path: str, message_id: str) -> str:
    return (
        path.replace("{provider}", "smspilot")
        .replace("{message_id}", message_id)
        .replace("{token}", "no-such-token-0123456789")
    )


def test_the_private_routes_are_404_on_the_public_listener_and_back(service: Smsbus) -> None:
    message_id = str(next(_ids))
    for method, path in sorted(PRIVATE - PUBLIC):
        answer = httpx.request(method, service.base + concrete(path, message_id), json={})
        assert 404 == answer.status_code, (method, path)
    for method, path in sorted(PUBLIC - PRIVATE):
        answer = httpx.request(method, service.api + concrete(path, message_id))
        assert 404 == answer.status_code, (method, path)


def test_no_public_answer_shows_a_tracked_message(service: Smsbus) -> None:
    message_id = str(next(_ids))
    service.register(
        {"provider": "smspilot", "message_id": message_id, "phone": PHONE,
         "client_ref": CLIENT_REF},
    )  # fmt: skip
    state = httpx.get(f"{service.api}/v1/messages/smspilot/{message_id}").json()
    assert (PHONE, CLIENT_REF) == (state["phone"], state["client_ref"])  # private: yes
    answers = [
        httpx.get(f"{service.base}/callbacks/smspilot",
                  params={"server_id": message_id, "status": 1}),
        httpx.get(f"{service.base}/callbacks/smspilot",
                  params={"server_id": message_id, "status": "x"}),
        *(httpx.request(m, service.base + concrete(p, message_id)) for m, p in sorted(PUBLIC)),
        *(httpx.request(m, service.base + concrete(p, message_id)) for m, p in sorted(PRIVATE)),
    ]  # fmt: skip
    for answer in answers:
        body = answer.text
        assert PHONE not in body and CLIENT_REF not in body, answer.request.url


def test_a_flood_of_junk_keeps_few_dead_letters_and_callbacks_fast(
    service: Smsbus, nats_server: NatsServer
) -> None:
    flood_size = 10_000

    def letters() -> int:
        found = read_stream(nats_server.url, service.stream, f"{service.prefix}.deadletter.>")
        return sum(1 for s in found if s.event["data"]["reason"] == "server_id is missing")

    before = letters()

    async def flood() -> tuple[list[int], list[float]]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=service.base, timeout=30, limits=limits) as client:
            statuses: list[int] = []
            good: list[float] = []

            async def junk(n: int) -> None:
                answer = await client.get("/callbacks/smspilot", params={"status": 2, "n": n})
                statuses.append(answer.status_code)

            async def callbacks(until: asyncio.Future[None]) -> None:
                # SMSPilot is another peer on a connection of its own: sharing the flood's
                # connection pool would time how long httpx keeps it waiting for a free
                # connection (seconds, at times), not how fast smsbus answers.
                async with httpx.AsyncClient(base_url=service.base, timeout=30) as pilot:
                    while not until.done():
                        started = time.perf_counter()
                        answer = await pilot.get(
                            "/callbacks/smspilot", params={"server_id": next(_ids), "status": 2}
                        )
                        assert "OK" == answer.text
                        good.append(time.perf_counter() - started)
                        await asyncio.sleep(0.01)

            done = asyncio.get_running_loop().create_future()
            checker = asyncio.ensure_future(callbacks(done))
            gate = asyncio.Semaphore(16)

            async def one(n: int) -> None:
                async with gate:
                    await junk(n)

            await asyncio.gather(*(one(n) for n in range(flood_size)))
            done.set_result(None)
            await checker
            return statuses, good

    started = time.monotonic()
    statuses, good = asyncio.run(flood())
    took = time.monotonic() - started
    assert [400] * flood_size == statuses
    good.sort()
    p99 = good[int(len(good) * 0.99)]
    # The rate's burst (60) and what refills while the flood lasts (one a second).
    allowed = 60 + int(took) + 1
    kept = wait_for(lambda: letters() - before or None, what="the dead letters")
    dropped = service.metric("smsbus_deadletters_dropped_total", provider="smspilot")
    print(f"flood: {flood_size} malformed callbacks in {took:.1f} s; dead letters kept {kept}, "
          f"dropped {dropped:g}; good callbacks during it: {len(good)}, "
          f"p99 {p99 * 1000:.1f} ms")  # fmt: skip
    assert kept <= allowed
    assert dropped >= flood_size - allowed
    assert p99 < 0.5
