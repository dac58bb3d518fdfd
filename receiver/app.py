"""The HTTP app: the SMSPilot callback (hot path, plain ASGI) in front of a Starlette app with the
operational routes. No route answers with a traceback."""

from __future__ import annotations

import re
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


def create_app(bus: Bus, *, receive: bool = True) -> App:
    """The app; with receive=False (`serve --pollers-only`) only the operational routes."""
    callbacks = SMSPilotCallbacks(bus)
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
    api = [
        Route("/v1/messages", register, methods=["POST"]),
        Route("/v1/messages/{provider}/{message_id:any}", show, methods=["GET"]),
    ]
    operations = Starlette(
        routes=[
            *(api if receive else []),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        middleware=[Middleware(LimitBody)],
        exception_handlers={404: json_error, 405: json_error},
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and headers_too_large(scope):
            is_callback = callbacks.matches(scope["path"])
            if is_callback:
                bus.metrics.callback_outcome["too_large"].inc()
            log.warning("request headers too large", callback=is_callback,
                        headers=len(scope["headers"]))  # fmt: skip
            reason = f"request headers exceed {HEADER_LIMIT} bytes or {MAX_HEADERS} fields"
            await send_text(send, 431, reason)
            return
        if receive and scope["type"] == "http" and callbacks.matches(scope["path"]):
            await callbacks(scope, receive, send)
        else:
            await operations(scope, receive, send)

    routes = [
        (method, re.sub(r":\w+}", "}", route.path))
        for route in operations.routes
        if isinstance(route, Route)
        for method in sorted(route.methods or ()) if method != "HEAD"
    ]  # fmt: skip
    if receive:
        routes += [(m, p) for p in (CALLBACK, CALLBACK + "/{token}") for m in callbacks.METHODS]
    return App(app, routes)
