"""Calling a provider (pollers.http) against a real HTTP server that answers slowly: an answer
is taken whole within its deadline, however it trickles in, or the provider is unavailable."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from bus.errors import ProviderPayloadError, ProviderUnavailable
from pollers import http
from tests.fakes.server import Served
from tests.support import wait_for


class Trickle:
    """An ASGI app whose answer is `chunks` bytes, one every `every` seconds: each read is
    quick, the whole answer is not. It stops when the client hangs up, and says so."""

    def __init__(self, chunks: int, every: float) -> None:
        self.chunks, self.every = chunks, every
        self.hung_up = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gone = asyncio.ensure_future(self._hang_up(receive))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(self.chunks):
            if gone.done():
                return
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await asyncio.sleep(self.every)
        await send({"type": "http.response.body", "body": b""})
        gone.cancel()

    async def _hang_up(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hung_up = True


async def _post(url: str, within: float) -> bytes:
    async with httpx.AsyncClient() as client:
        return await http.post(client, url, form={"login": "a"}, within=within)


def test_an_answer_that_trickles_past_its_deadline_is_an_unavailable_provider() -> None:
    # A byte every 0.2 s never trips the 10 s read timeout; it would go on for 20 s.
    app = Trickle(chunks=100, every=0.2)
    with Served(app) as provider:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match=r"no whole answer from .* within 1 s"):
            asyncio.run(_post(provider.url + "/api", within=1.0))
        assert time.monotonic() - started < 5
        wait_for(lambda: app.hung_up, what="the connection closed")


def test_an_answer_that_trickles_in_within_its_deadline_is_taken_whole() -> None:
    with Served(Trickle(chunks=5, every=0.1)) as provider:
        assert b"xxxxx" == asyncio.run(_post(provider.url + "/api", within=10.0))


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Tue, 08 Dec 2026 00:01:30 GMT", 90.0),  # an HTTP date, 90 s from `now`
        ("Tue, 08 Dec 2026 00:00:00 GMT", 0.0),  # now or past: no wait
        ("86400", http.RETRY_AFTER_MOST),  # a day: held to the most
        ("-5", 0.0),
        ("soon", 0.0),
        ("1.5", 0.0),  # not a delay-seconds (whole seconds only)
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_retry_after_reads_seconds_or_a_date(value: str | None, wait: float) -> None:
    now = datetime(2026, 12, 8, 0, 0, 0, tzinfo=UTC)
    assert wait == http.retry_after(value, now=now)


def test_an_unreachable_provider_says_why_in_one_line_without_a_proxy_password() -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    assert "ConnectError: [Errno 111] Connection refused" == http._reason(refused)
    proxy = httpx.ProxyError("cannot connect to\n  http://smsbus:hunter2@proxy.local:3128 now")
    assert "ProxyError: cannot connect to http://***@proxy.local:3128 now" == http._reason(proxy)
    assert "ReadError" == http._reason(httpx.ReadError(""))


class Answer:
    """An ASGI app answering 200 with `body` to every request."""

    def __init__(self, body: bytes, content_type: bytes = b"text/html") -> None:
        self.body, self.content_type = body, content_type

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", self.content_type)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@pytest.mark.parametrize(
    ("body", "instead"),
    [
        (
            "<!DOCTYPE html><html><title>Технические\n работы &amp; обновление</title>".encode(
                "cp1251"
            ),
            "a web page titled 'Технические работы & обновление'",
        ),
        (
            "\ufeff\n<HTML lang=ru><TITLE>Сервис недоступен</TITLE>".encode(),
            "a web page titled 'Сервис недоступен'",
        ),
        (b"<html>\n<body>502 Bad Gateway</body></html>", "a web page"),
        (b"<html><title>" + b"x" * 500 + b"</title>", f"a web page titled '{'x' * 80}'"),
    ],
)
def test_a_web_page_with_200_is_an_unavailable_provider(body: bytes, instead: str) -> None:
    """A maintenance page or a proxy's, served with 200 where the API answers XML or JSON, is
    the provider down (as a 503 would say), with the page's title; not an answer that cannot be
    read, kept as a dead letter at every call."""
    with Served(Answer(body)) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            asyncio.run(_post(provider.url + "/api", within=10.0))
    said = str(failed.value)
    assert said.endswith(f"/api answered HTTP 200 with {instead}, not its API's answer: "
                         "a maintenance page or a proxy's?")  # fmt: skip
    assert "\n" not in said


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?>\n<response><code>1</code></response>',
        b"<response><code>4</code></response>",
        b'{"error": {"code": 100, "description": "<html> in a string"}}',
        b"<htmlresponse/>",  # not a page: an element whose name begins so
        b"ERROR = 2 (auth)",
        b"",  # maybe one request's failure, or an empty list: the parser's to say
        b" \r\n",
    ],
)
def test_an_api_answer_is_taken_as_it_is(body: bytes) -> None:
    with Served(Answer(body, b"text/xml")) as provider:
        assert body == asyncio.run(_post(provider.url + "/api", within=10.0))


class Status:
    """An ASGI app answering every request with `status` and a short HTML page."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/html")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"<html>Not here</html>"})


@pytest.mark.parametrize("status", [404, 405, 410])
def test_a_path_with_no_api_is_an_unavailable_provider_whose_address_is_in_question(
    status: int,
) -> None:
    """Every documented call goes to one fixed path: "not found" there says that the address
    holds no such API (a host serving only the provider's website, an API moved), not that a
    request was wrong; the provider is down for us, and the error points at SMSBUS_<P>_URL."""
    with Served(Status(status)) as provider:
        with pytest.raises(ProviderUnavailable) as failed:
            asyncio.run(_post(provider.url + "/api", within=10.0))
    assert str(failed.value).endswith(
        f"/api answered HTTP {status}: no API there; is SMSBUS_<P>_URL the provider's API "
        "address (scheme, host and port)?"
    )


def test_another_client_error_is_an_answer_kept_for_the_dead_letter() -> None:
    with Served(Status(400)) as provider:
        with pytest.raises(ProviderPayloadError, match=r"/api answered HTTP 400$") as failed:
            asyncio.run(_post(provider.url + "/api", within=10.0))
    assert b"<html>Not here</html>" == failed.value.raw
