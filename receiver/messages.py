"""`POST /v1/messages` registers sent messages for tracking; `GET /v1/messages/<p>/<id>` shows one.

A registration is published to `<prefix>.track.<provider>`, the same subject a sending app may use
directly, and `202` means it is durable in the stream (or the spool); the projector stores it as
state shortly after. Validation is all-or-nothing: one bad item and nothing is published.
"""

from __future__ import annotations

import asyncio

import nats.errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bus.errors import PublishError
from bus.messages import TrackErrors, kv_key, parse_track_batch
from bus.projector import read_state
from bus.runtime import Runtime
from bus.statuses import PROVIDERS


def routes(runtime: Runtime) -> tuple:  # type: ignore[type-arg]
    prefix = runtime.settings.subject_prefix

    async def register(request: Request) -> Response:
        try:
            items = parse_track_batch(await request.body())
        except TrackErrors as exc:
            return JSONResponse({"errors": exc.errors}, status_code=400)
        try:
            await asyncio.gather(*(runtime.publisher.publish(i.event(prefix)) for i in items))
        except PublishError:
            return JSONResponse({"error": "registrations could not be stored; retry"}, 503)
        return JSONResponse({"accepted": len(items)}, status_code=202)

    async def show(request: Request) -> Response:
        provider = request.path_params["provider"]
        message_id = request.path_params["message_id"]
        if provider not in PROVIDERS:
            return JSONResponse({"error": f"unknown provider {provider!r}"}, status_code=404)
        assert runtime.messages is not None
        try:
            state, _ = await read_state(runtime.messages, kv_key(provider, message_id))
        except (TimeoutError, nats.errors.Error):
            return JSONResponse({"error": "state store unavailable; retry"}, status_code=503)
        if state is None:
            return JSONResponse({"error": "unknown message"}, status_code=404)
        return JSONResponse(state.public())

    return register, show
