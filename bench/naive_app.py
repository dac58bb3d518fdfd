"""What a user would write by hand: a Starlette route that publishes each SMSPilot callback to
JetStream (a JSON body, `Nats-Msg-Id`) and answers OK once `js.publish` returns its ack. No
CloudEvent, no spool, no state, no log line, no metrics. NATS from NAIVE_NATS_URL; its stream is
NAIVE (subject naive.>), created if missing."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import nats
from nats.js.api import StreamConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

state: dict[str, object] = {}


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    nc = await nats.connect(os.environ["NAIVE_NATS_URL"])
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.add_stream(StreamConfig(name="NAIVE", subjects=["naive.>"]))
    state["js"] = js
    yield
    await nc.close()


async def callback(request: Request) -> PlainTextResponse:
    params = request.query_params
    server_id, status = params["server_id"], params["status"]
    body = json.dumps({"server_id": server_id, "status": status, "error": params.get("error")})
    await state["js"].publish(  # type: ignore[attr-defined]
        f"naive.status.{status}", body.encode(), headers={"Nats-Msg-Id": f"{server_id}:{status}"}
    )
    return PlainTextResponse("OK")


app = Starlette(routes=[Route("/callbacks/smspilot", callback, methods=["GET"])], lifespan=lifespan)
