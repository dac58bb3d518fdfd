"""The HTTP app: the SMSPilot callback (hot path, plain ASGI) in front of a Starlette app with the
operational routes. No route answers with a traceback."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

import structlog
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.core import Bus
from bus.metrics import CONTENT_TYPE
from receiver import messages
from receiver.http import (
    HEADER_LIMIT,
    MAX_HEADERS,
    REGISTRATION_BODY_LIMIT,
    ASGIApp,
    LimitBody,
    Receive,
    Scope,
    Send,
    headers_too_large,
    send_text,
)
from receiver.openapi import openapi
from receiver.smspilot import PATH as CALLBACK
from receiver.smspilot import SMSPilotCallbacks

log = structlog.get_logger("smsbus.http")


class AnyText(PathConvertor):
    """A path parameter of any characters, slashes and newlines included (message ids are
    the providers' text)."""

    regex = r"[\s\S]+"


register_url_convertor("any", AnyText())


async def json_error(request: Request, exc: Exception) -> Response:
    """404 and 405 of the JSON routes, in JSON like their other answers."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


class App:
    """The ASGI app, and the (method, path) pairs it serves for `/openapi.json`'s test."""

    def __init__(self, handle: ASGIApp, routes: list[tuple[str, str]]) -> None:
        self._handle = handle
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handle(scope, receive, send)


def _operations(routes: list[Route]) -> Starlette:
    larger = {("POST", "/v1/messages"): REGISTRATION_BODY_LIMIT}
    return Starlette(
        routes=routes,
        middleware=[Middleware(LimitBody, larger=larger)],
        exception_handlers={404: json_error, 405: json_error},
    )


def _served(starlette: Starlette) -> list[tuple[str, str]]:
    return [
        (method, re.sub(r":\w+}", "}", route.path))
        for route in starlette.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ()) if method != "HEAD"
    ]  # fmt: skip


def _guarded(handle: ASGIApp, is_callback: Callable[[str], bool], bus: Bus) -> ASGIApp:
    """Headers over the limits get a 431 on every route, before anything else reads them."""

    pace = bus.pace

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        pace.started()  # polls give way while requests crowd in (bus.pace)
        try:
            if scope["type"] == "http" and headers_too_large(scope):
                callback = is_callback(scope["path"])
                if callback:
                    bus.metrics.callback_outcome["too_large"].inc()
                log.warning("request headers too large", callback=callback,
                            headers=len(scope["headers"]))  # fmt: skip
                reason = f"request headers exceed {HEADER_LIMIT} bytes or {MAX_HEADERS} fields"
                await send_text(send, 431, reason)
                return
            await handle(scope, receive, send)
        finally:
            pace.finished()

    return app


@dataclass(frozen=True)
class Listeners:
    """The two apps (CONTRACT.md section 3): `public` faces the providers and the cluster
    (callbacks, health, readiness, metrics: nothing that shows a message); `private` serves the
    sending app (registration, message state, the API description). Neither answers the
    other's routes: they are 404 there."""

    public: App
    private: App


def create_apps(bus: Bus, *, receive: bool = True) -> Listeners:
    """Both apps; with receive=False (`serve --pollers-only`) no callbacks and no /v1 routes."""
    callbacks = SMSPilotCallbacks(bus, bus.settings.deadletter_rate)
    description = openapi(receive=receive, version=version("smsbus"))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        readiness = await bus.readiness()
        body = {
            "ready": readiness.ready,
            "reason": readiness.reason,
            "spool_depth": bus.publisher.spool_depth,
            "providers": {
                name: {
                    "enabled": state.enabled,
                    "leader": state.leader,
                    "last_success": state.last_success,
                    "last_error": state.last_error,
                }
                for name, state in bus.providers.items()
            },
            **bus.detail(),
        }
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(bus.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(description)

    register, show = messages.routes(bus)
    public = _operations(
        [
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    private = _operations(
        [
            *(
                [
                    Route("/v1/messages", register, methods=["POST"]),
                    Route("/v1/messages/{provider}/{message_id:any}", show, methods=["GET"]),
                ]
                if receive
                else []
            ),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ]
    )

    async def public_app(scope: Scope, receive_: Receive, send: Send) -> None:
        if receive and scope["type"] == "http" and callbacks.matches(scope["path"]):
            await callbacks(scope, receive_, send)
        else:
            await public(scope, receive_, send)

    public_routes = _served(public)
    if receive:
        public_routes += [
            (m, p) for p in (CALLBACK, CALLBACK + "/{token}") for m in callbacks.METHODS
        ]
    return Listeners(
        public=App(_guarded(public_app, callbacks.matches, bus), public_routes),
        private=App(_guarded(private, lambda path: False, bus), _served(private)),
    )
