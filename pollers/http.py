"""Calling a provider: one place that turns HTTP failures into the error tree and never lets a
credential into a message. Requests carry credentials only in bodies, never in URLs."""

from __future__ import annotations

import asyncio
import email.utils
import html
import re
from collections.abc import Callable, Iterable, Mapping, Sized
from datetime import UTC, datetime
from typing import TypeVar

import httpx

from bus.config import redact_url
from bus.errors import (
    ProviderAuthError,
    ProviderPayloadError,
    ProviderRowError,
    ProviderUnavailable,
)
from pollers.values import utf8_or_windows_1251

T = TypeVar("T")
R = TypeVar("R")

MAX_ANSWER = 8 * 1024 * 1024  # a provider answer larger than this is refused, not parsed
TIMEOUT = httpx.Timeout(10.0, connect=5.0)  # to connect, and between two reads or writes
# The whole answer, however it trickles in: the timeouts above are per read, so an answer that
# brings a byte every few seconds (a broken proxy, a provider in trouble) would hold the poller
# for ever; past this the provider is unavailable, and the poller backs off as from any outage.
ANSWER_WITHIN = 60.0
# A Retry-After longer than this (the default SMSBUS_<P>_MAX_INTERVAL) is more likely a proxy's
# setting than the provider's wish: the poller asks again after this at the latest.
RETRY_AFTER_MOST = 600.0
NO_API_HERE = (404, 405, 410)  # HTTP statuses saying that the path holds no API
REASON_MOST = 200  # characters of an HTTP error's own words kept in its message
_USERINFO = re.compile(r"(\w+://)[^/@\s]*@")  # credentials in a URL (a proxy's)
_WEB_PAGE = re.compile(rb"\A(?:\xef\xbb\xbf)?\s*<(?:!doctype\s+html|html)[\s>]", re.I)
_TITLE = re.compile(rb"<title[^>]{0,200}>(.{0,1000}?)</title", re.I | re.S)
PAGE_HEAD = 16 * 1024  # where a web page's title is looked for
TITLE_MOST = 80  # characters of a web page's title kept in the error


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    form: Mapping[str, str] | None = None,
    content: bytes | None = None,
    content_type: str | None = None,
    limit: int = MAX_ANSWER,
    within: float = ANSWER_WITHIN,
) -> bytes:
    """POST and return the answer's body, whole within `within` seconds; ProviderError
    subclasses on failure."""
    headers = {"content-type": content_type} if content_type else None
    try:
        async with (
            asyncio.timeout(within),
            http.stream(
                "POST", url, data=form, content=content, headers=headers, timeout=TIMEOUT
            ) as response,
        ):
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ProviderPayloadError(f"answer larger than {limit} bytes")
    except httpx.TimeoutException:
        raise ProviderUnavailable(f"no answer from {url} in time") from None
    except TimeoutError:
        raise ProviderUnavailable(f"no whole answer from {url} within {within:g} s") from None
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"cannot reach {url}: {_reason(exc)}") from None
    status = response.status_code
    if status in (401, 403):
        raise ProviderAuthError(f"{url} answered HTTP {status}")
    if 300 <= status < 400:  # not followed: a POST's body (its credentials) goes nowhere else
        moved = redact_url(response.headers.get("location", ""))[:REASON_MOST]
        raise ProviderUnavailable(
            f"{url} answered HTTP {status}, moved to {moved or 'an address it does not give'}: "
            "has the provider's address changed (SMSBUS_<P>_URL)?"
        )
    if status >= 500 or status == 429:
        wait = retry_after(response.headers.get("retry-after"))
        raise ProviderUnavailable(
            f"{url} answered HTTP {status}" + (f", retry after {wait:g} s" if wait else ""),
            retry_after=wait,
        )
    if status in NO_API_HERE:
        # Every documented call goes to one fixed path, whatever it asks: nothing there is no
        # request's fault but the address's (a host that serves only the provider's website,
        # an API moved), so the provider is down for us, not answering something to keep.
        raise ProviderUnavailable(
            f"{url} answered HTTP {status}: no API there; is SMSBUS_<P>_URL the provider's "
            "API address (scheme, host and port)?"
        )
    if status >= 400:
        raise ProviderPayloadError(f"{url} answered HTTP {status}", raw=bytes(body))
    if (page := _web_page(body)) is not None:
        # Not an answer that cannot be read but no API's answer at all, and the same for every
        # request: a maintenance page or a proxy's, served with 200. The provider is down, as
        # with a 503 (one request at each back-off's end), and the page is no dead letter.
        raise ProviderUnavailable(
            f"{url} answered HTTP {status} with {page}, not its API's answer: "
            "a maintenance page or a proxy's?"
        )
    return bytes(body)


def _web_page(body: bytes | bytearray) -> str | None:
    """'a web page', with its title, when the answer is one (none of the providers' documented
    answers is: they are XML or JSON), else None. An empty answer is not taken for one: it may
    be a request's alone (a script failing on its ids), or, for a list, the list empty."""
    if not _WEB_PAGE.match(body):
        return None
    if (found := _TITLE.search(body, 0, PAGE_HEAD)) is None:
        return "a web page"
    title = html.unescape(utf8_or_windows_1251(bytes(found.group(1))))
    title = " ".join(title.split())[:TITLE_MOST]
    return f"a web page titled {title!r}" if title else "a web page"


def _reason(exc: httpx.HTTPError) -> str:
    """What failed, in one line: the type and what the error says (a certificate not trusted,
    a name not resolved, a connection refused), any `user:password@` in it masked."""
    said = " ".join(str(exc).split())[:REASON_MOST]
    said = _USERINFO.sub(r"\1***@", said)
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


def retry_after(value: str | None, now: datetime | None = None) -> float:
    """The wait a 429 or 5xx asks for in its Retry-After (RFC 9110 section 10.2.3: seconds, or an
    HTTP date), at most RETRY_AFTER_MOST; 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdecimal():
        wait = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 0.0
        if when.tzinfo is None:
            return 0.0
        wait = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(wait, 0.0), RETRY_AFTER_MOST)


def parsed(body: bytes, parse: Callable[[], T]) -> T:
    """Run a parser over an answer; its ProviderPayloadError carries the answer for the dead
    letter (cut to size there)."""
    try:
        return parse()
    except ProviderPayloadError as exc:
        raise type(exc)(str(exc), raw=body) from None


def rows(read: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`read` over the rows of an answer about several ids: what cannot be read in a row is
    that row's fault (ProviderRowError), and the ids may be asked about again in parts."""
    try:
        return [read(item) for item in items]
    except ProviderRowError:
        raise
    except ProviderPayloadError as exc:
        raise ProviderRowError(str(exc)) from None


def each(
    read: Callable[[T], R], items: Iterable[T], raw: Callable[[T], bytes]
) -> tuple[list[R], list[ProviderRowError]]:
    """`read` over the rows of an answer whose rows stand on their own (an account's history,
    its inbound SMS), which cannot be asked for again one by one: a row that cannot be read is
    set aside, with its `raw` form, and the rest read. A failure for one row would otherwise
    fail every poll while the row stays in the window, and all that comes after it with it.
    What a list none of whose rows can be read means is the caller's: an inbound cursor stays
    where it is (`Window.take`), a probe fails (`none_read`)."""
    done, unreadable = [], []
    for item in items:
        try:
            done.append(read(item))
        except ProviderPayloadError as exc:
            unreadable.append(ProviderRowError(str(exc), raw=raw(item)))
    return done, unreadable


def none_read(done: Sized, unreadable: list[ProviderRowError]) -> None:
    """ProviderPayloadError when rows were listed and not one could be read: a change of the
    answer's form rather than one bad row, which fails the call until a release reads it (a
    probe: `smsbus check` reads one row)."""
    if unreadable and not done:
        raise ProviderPayloadError(f"no row can be read: {unreadable[0]}")
