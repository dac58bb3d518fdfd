"""Calling a provider: one place that turns HTTP failures into the error tree and never lets a
credential into a message. Requests carry credentials only in bodies, never in URLs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import httpx

from bus.errors import ProviderAuthError, ProviderPayloadError, ProviderUnavailable

T = TypeVar("T")

MAX_ANSWER = 8 * 1024 * 1024  # a provider answer larger than this is refused, not parsed
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


async def post(
    http: httpx.AsyncClient,
    url: str,
    *,
    form: Mapping[str, str] | None = None,
    content: bytes | None = None,
    content_type: str | None = None,
    limit: int = MAX_ANSWER,
) -> bytes:
    """POST and return the answer's body; ProviderError subclasses on failure."""
    headers = {"content-type": content_type} if content_type else None
    try:
        async with http.stream(
            "POST", url, data=form, content=content, headers=headers, timeout=TIMEOUT
        ) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ProviderPayloadError(f"answer larger than {limit} bytes")
    except httpx.TimeoutException:
        raise ProviderUnavailable(f"no answer from {url} in time") from None
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None
    status = response.status_code
    if status in (401, 403):
        raise ProviderAuthError(f"{url} answered HTTP {status}")
    if status >= 500 or status == 429:
        raise ProviderUnavailable(f"{url} answered HTTP {status}")
    if status >= 400:
        raise ProviderPayloadError(f"{url} answered HTTP {status}", raw=bytes(body))
    return bytes(body)


def parsed(body: bytes, parse: Callable[[], T]) -> T:
    """Run a parser over an answer; its ProviderPayloadError carries the answer for the dead
    letter (cut to size there)."""
    try:
        return parse()
    except ProviderPayloadError as exc:
        raise ProviderPayloadError(str(exc), raw=body) from None
