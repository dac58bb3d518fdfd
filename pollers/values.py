"""Values in provider answers: zone-less local dates (read in the provider's zone, published
in UTC), decimal amounts, and text in one of the two charsets Russian servers use."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from zoneinfo import ZoneInfo

from bus.errors import ProviderPayloadError

ZEROS = "0-.: \t\n"  # all a date that says "no date" is made of


def utf8_or_windows_1251(body: bytes) -> str:
    """Text that is UTF-8, else windows-1251: Russian web servers' default charset."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("cp1251", errors="replace")


def local(value: str | None, fmt: str, tz: ZoneInfo) -> datetime | None:
    """A provider's local date as an aware UTC datetime; None when absent or all zeros, in any
    form (`0000-00-00 00:00:00`, or SMSC's `00.00.0000 00:00:00`)."""
    if value is None or not value.strip(ZEROS) or value.strip().startswith("0000-00-00"):
        return None
    return _parsed(value.strip(), fmt, tz)


@lru_cache(maxsize=4096)  # an answer of 100 reports holds few distinct seconds; strptime is slow
def _parsed(value: str, fmt: str, tz: ZoneInfo) -> datetime:
    try:
        return datetime.strptime(value, fmt).replace(tzinfo=tz).astimezone(UTC)
    except ValueError:
        raise ProviderPayloadError(f"date {value[:40]!r} is not in the documented form") from None


def format_local(moment: datetime, fmt: str, tz: tzinfo) -> str:
    return moment.astimezone(tz).strftime(fmt)


def decimal(raw: object, what: str) -> Decimal:
    """A finite decimal amount, or ProviderPayloadError naming `what`."""
    try:
        value = Decimal(str(raw).strip()) if raw is not None else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise ProviderPayloadError(f"{what} is not a number")
    return value


async def balance_text(read: Callable[[], Awaitable[Decimal]], unit: str) -> str:
    """What `smsbus check` prints of a balance reading."""
    return f"balance {await read()} {unit}"
