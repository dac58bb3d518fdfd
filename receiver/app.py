"""The HTTP app: the SMSPilot callback (hot path, plain ASGI) in front of a Starlette app with the
operational routes. No route answers with a traceback."""

from __future__ import annotations

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bus.metrics import CONTENT_TYPE
from bus.runtime import Runtime
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
from receiver.smspilot import SMSPilotCallbacks

log = structlog.get_logger("smsbus.http")


def create_app(runtime: Runtime, *, receive: bool = True) -> ASGIApp:
    """The app; with receive=False (`serve --pollers-only`) only the operational routes."""
    callbacks = SMSPilotCallbacks(runtime)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        readiness = await runtime.readiness()
        body = {
            "ready": readiness.ready,
            "reason": readiness.reason,
            "spool_depth": runtime.publisher.spool_depth,
            "providers": {
                name: {
                    "enabled": state.enabled,
                    "leader": state.leader,
                    "last_success": state.last_success,
                    "last_error": state.last_error,
                }
                for name, state in runtime.providers.items()
            },
        }
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)

    register, show = messages.routes(runtime)
    api = [
        Route("/v1/messages", register, methods=["POST"]),
        Route("/v1/messages/{provider}/{message_id:path}", show, methods=["GET"]),
    ]
    operations = Starlette(
        routes=[
            *(api if receive else []),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(LimitBody)],
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and headers_too_large(scope):
            is_callback = callbacks.matches(scope["path"])
            if is_callback:
                runtime.metrics.callback_outcome["too_large"].inc()
            log.warning("request headers too large", callback=is_callback,
                        headers=len(scope["headers"]))  # fmt: skip
            reason = f"request headers exceed {HEADER_LIMIT} bytes or {MAX_HEADERS} fields"
            await send_text(send, 431, reason)
            return
        if receive and scope["type"] == "http" and callbacks.matches(scope["path"]):
            await callbacks(scope, receive, send)
        else:
            await operations(scope, receive, send)

    return app
