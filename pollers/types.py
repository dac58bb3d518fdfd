"""What a provider client returns, and the shape every provider client has."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import ClassVar, Protocol

import httpx

from bus.config import ProviderSettings


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


class ProviderClient(Protocol):
    """One provider's API. Methods raise bus.errors.ProviderError subclasses."""

    name: ClassVar[str]
    status_batch: ClassVar[int]  # ids per status request; 0: statuses are not polled per id
    balance_unit: ClassVar[str | None]  # None: the provider's document has no balance method
    has_inbound: ClassVar[bool]
    has_history: ClassVar[bool]  # statuses come from an account-wide history (SMSC)

    def __init__(self, settings: ProviderSettings, http: httpx.AsyncClient) -> None: ...

    async def statuses(self, ids: list[str]) -> list[StatusReport]: ...

    async def history(self) -> list[StatusReport]: ...

    async def inbound(self, cursor: str | None) -> tuple[list[InboundSms], str | None]: ...

    async def balance(self) -> Decimal:
        """Called only when `balance_unit` is set."""
        ...

    async def probe(self) -> str:
        """For a provider without a balance method (`balance_unit` None): one cheap authenticated
        call for `smsbus check`, and a short description of its result."""
        ...
