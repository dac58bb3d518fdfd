"""What a provider call returns, and what a provider can do (`Provider`), as data."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import httpx

from bus.config import ProviderSettings
from bus.errors import ProviderError, ProviderRowError


@dataclass(frozen=True, slots=True)
class StatusReport:
    message_id: str
    raw_status: str
    occurred_at: datetime | None = None
    error_code: str | None = None
    error: str | None = None
    phone: str | None = None


@dataclass(frozen=True, slots=True)
class InboundSms:
    message_id: str
    sender: str
    recipient: str
    text: str
    sent_at: datetime | None = None


Statuses = Callable[[list[str]], Awaitable[list[StatusReport]]]
# The account's history as far as it was read: its reports, the rows that could not be read
# (set aside), and the failure that ended the reading part-way (None when none did): what was
# read before it is published, then the call fails as any does.
HistoryRead = tuple[list[StatusReport], list[ProviderRowError], ProviderError | None]
History = Callable[[], Awaitable[HistoryRead]]
# Inbound SMS after a cursor: the new ones, the cursor to save once they are stored, and the
# rows that could not be read (set aside).
InboundRead = tuple[list[InboundSms], str | None, list[ProviderRowError]]
Inbound = Callable[[str | None], Awaitable[InboundRead]]


@dataclass(frozen=True, slots=True)
class PerId:
    """Statuses asked for by message id, `batch` ids a request (the document's limit)."""

    fetch: Statuses
    batch: int


@dataclass(frozen=True, slots=True)
class Balance:
    read: Callable[[], Awaitable[Decimal]]
    unit: str


@dataclass(frozen=True, slots=True)
class Provider:
    """What one provider can do, as its document describes it: the engine starts a loop for each
    capability there is, and none for one there is not. Every callable raises the
    bus.errors.ProviderError tree on failure. `check` is the one cheap authenticated call of
    `smsbus check` (the balance where there is one)."""

    name: str
    check: Callable[[], Awaitable[str]]
    statuses: PerId | None = None
    history: History | None = None  # an account-wide history of statuses (SMSC)
    inbound: Inbound | None = None
    balance: Balance | None = None


Build = Callable[[ProviderSettings, httpx.AsyncClient], Provider]
