"""`/openapi.json`: in step with the routes, and schemathesis holding the live service to it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.specs.openapi import checks as openapi_checks

from bus.config import load_settings
from bus.core import open_bus
from receiver.app import create_apps
from receiver.openapi import PRIVATE, PUBLIC, listener_paths, openapi
from tests.support import NatsServer, Smsbus, isolated_env

METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


def described(spec: dict, listener: str) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    return {
        (method.upper(), path)
        for path, item in listener_paths(spec, listener).items()
        for method in item
        if method in METHODS
    }


@pytest.mark.parametrize("receive", [True, False], ids=["serve", "pollers-only"])
def test_description_matches_the_routes(
    receive: bool, nats_server: NatsServer, tmp_path: Path
) -> None:
    async def routes() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        env = isolated_env(nats_server.url, SMSBUS_DATA_DIR=str(tmp_path))
        async with open_bus(load_settings(env)) as bus:
            apps = create_apps(bus, receive=receive)
            return apps.public.routes, apps.private.routes

    public, private = asyncio.run(routes())
    description = openapi(receive=receive)
    assert described(description, PUBLIC) == set(public)
    assert described(description, PRIVATE) == set(private)
    assert len(public) == len(set(public)) and len(private) == len(set(private))
    assert all(item.get("x-listeners") for item in description["paths"].values())
    if receive:
        assert ("POST", "/callbacks/smspilot/{token}") in public
        assert ("GET", "/v1/messages/{provider}/{message_id}") in private
    assert ("GET", "/openapi.json") in private


@pytest.fixture(scope="module")
def service(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Smsbus]:
    bus = Smsbus(isolated_env(nats_server.url), tmp_path_factory.mktemp("openapi")).start()
    yield bus
    assert 0 == bus.stop()


def test_served_description_is_the_one_in_the_code(service: Smsbus) -> None:
    served = httpx.get(f"{service.api}/openapi.json", timeout=10)
    assert 200 == served.status_code
    assert served.headers["content-type"].startswith("application/json")
    assert openapi(receive=True, version=served.json()["info"]["version"]) == served.json()


# The description in the code, one part per listener; the test above holds the served one to it.
def _part(listener: str) -> dict:  # type: ignore[type-arg]
    description = openapi(receive=True)
    return {**description, "paths": listener_paths(description, listener)}


public_schema = schemathesis.openapi.from_dict(_part(PUBLIC))
private_schema = schemathesis.openapi.from_dict(_part(PRIVATE))


# No 5xx, and every answer is one the description allows (status, content type, body, headers);
# input outside the schema must be refused with a 4xx.
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.positive_data_acceptance,
    openapi_checks.unsupported_method,
    openapi_checks.allow_header_conformance,
]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@public_schema.parametrize()
@SETTINGS
def test_the_public_listener_keeps_to_its_description(
    case: schemathesis.Case, service: Smsbus
) -> None:
    case.call_and_validate(base_url=service.base, checks=CHECKS, timeout=10)


@private_schema.parametrize()
@SETTINGS
def test_the_private_listener_keeps_to_its_description(
    case: schemathesis.Case, service: Smsbus
) -> None:
    case.call_and_validate(base_url=service.api, checks=CHECKS, timeout=10)
