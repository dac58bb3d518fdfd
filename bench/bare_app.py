"""The yardstick: a bare Starlette route that only answers OK, served like smsbus is."""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("OK")


app = Starlette(routes=[Route("/callbacks/smspilot", ok, methods=["GET", "POST"])])
