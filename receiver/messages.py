"""`POST /v1/messages` registers sent messages for tracking; `GET /v1/messages/<p>/<id>` shows one.

A registration is written into the message-state bucket itself, with the same compare-and-set
rules the projector uses, and `202` is sent only once every item's state is stored: from then on
every callback and poll of those messages, on every replica, carries their `phone` and
`client_ref` (CONTRACT.md section 3). When the bucket cannot be written (NATS is away) the answer
is `503` and the sending app retries; registering twice changes nothing. Validation is
all-or-nothing: one bad item and nothing is written.
"""

from __future__ import annotations

import asyncio

import nats.errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bus.core import Bus
from bus.events import PER_PHONE, rfc3339, utcnow
from bus.messages import MessageState, TrackErrors, kv_key, parse_track_batch, with_trace
from bus.statuses import PROVIDERS

WRITE_TIMEOUT_EXTRA = 3.0  # on top of SMSBUS_PUBLISH_TIMEOUT, for a batch of 1000 writes


def routes(bus: Bus) -> tuple:  # type: ignore[type-arg]
    timeout = bus.settings.publish_timeout + WRITE_TIMEOUT_EXTRA

    async def register(request: Request) -> Response:
        try:
            items = with_trace(
                parse_track_batch(await request.body()), request.headers.get("traceparent")
            )
        except TrackErrors as exc:
            return JSONResponse({"errors": exc.errors}, status_code=400)
        if not bus.conn.is_connected:
            return JSONResponse({"error": "NATS is not connected; retry"}, status_code=503)
        try:
            await asyncio.wait_for(bus.states.register(items, rfc3339(utcnow())), timeout)
        except (TimeoutError, nats.errors.Error):
            return JSONResponse({"error": "registrations could not be stored; retry"}, 503)
        return JSONResponse({"accepted": len(items)}, status_code=202)

    async def show(request: Request) -> Response:
        provider = request.path_params["provider"]
        message_id = request.path_params["message_id"]
        if provider not in PROVIDERS:
            return JSONResponse({"error": f"unknown provider {provider!r}"}, status_code=404)
        try:
            state, _ = await bus.states.read(kv_key(provider, message_id))
            if state is None and provider in PER_PHONE:
                state = await registered_number(provider, message_id)
        except (TimeoutError, nats.errors.Error):
            return JSONResponse({"error": "state store unavailable; retry"}, status_code=503)
        if state is None:
            return JSONResponse({"error": "unknown message"}, status_code=404)
        return JSONResponse(state.public())

    async def registered_number(provider: str, key: str) -> MessageState | None:
        """`<id>/<phone>` of an SMS-Pager or SMSC send that has no state of its own yet (none
        is written before the number's first status): tracked, nothing known yet, when the
        send's registration named that number (CONTRACT.md section 3: `200` for any message
        that was tracked)."""
        message_id, slash, phone = key.rpartition("/")
        if not slash:
            return None
        send, _ = await bus.states.read(kv_key(provider, message_id))
        if send is None or not send.tracked or send.phone != phone:
            return None
        return MessageState(
            provider, message_id, tracked=True, registered_at=send.registered_at, phone=phone,
            client_ref=send.client_ref, sent_at=send.sent_at, updated_at=send.registered_at,
            traceparent=send.traceparent,
        )  # fmt: skip

    return register, show
