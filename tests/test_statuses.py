"""Every row of CONTRACT.md section 5's tables, written out here independently of bus.statuses."""

from __future__ import annotations

import pytest

from bus import statuses
from bus.statuses import normalise

ROWS = [
    # provider, raw, error, status, final
    ("smspilot", "-2", None, "rejected", True),
    ("smspilot", "-1", None, "undelivered", True),
    ("smspilot", "-1", "600", "expired", True),
    ("smspilot", "-1", "601", "undelivered", True),
    ("smspilot", "-1", "603", "rejected", True),
    ("smspilot", "-1", "604", "cancelled", True),
    ("smspilot", "0", None, "queued", False),
    ("smspilot", "1", None, "sent", False),
    ("smspilot", "2", None, "delivered", True),
    ("smspilot", "2", "600", "delivered", True),  # the error refines only -1
    ("smspilot", "3", None, "scheduled", False),
    ("smstower", "processing", None, "sent", False),
    ("smstower", "delivered", None, "delivered", True),
    ("smstower", "undelivered", None, "undelivered", True),
    ("smspager", "waiting", None, "queued", False),
    ("smspager", "onModer", None, "queued", False),
    ("smspager", "enqueued", None, "sent", False),
    ("smspager", "delivered", None, "delivered", True),
    ("smspager", "notDelivered", None, "undelivered", True),
    ("smspager", "cancel", None, "cancelled", True),
    ("smsc", "-3", None, "unknown", True),
    ("smsc", "-2", None, "cancelled", True),
    ("smsc", "-1", None, "queued", False),
    ("smsc", "0", None, "sent", False),
    ("smsc", "1", None, "delivered", True),
    ("smsc", "2", None, "read", True),
    ("smsc", "3", None, "expired", True),
    ("smsc", "4", None, "read", True),
    ("smsc", "20", None, "undelivered", True),
    ("smsc", "25", None, "undelivered", True),
    ("smsc", "22", None, "rejected", True),
    ("smsc", "23", None, "rejected", True),
    ("smsc", "24", None, "rejected", True),
    ("epochta", "SENT", None, "sent", False),
    ("epochta", "DELIVERED", None, "delivered", True),
    ("epochta", "NOT_DELIVERED", None, "undelivered", True),
    ("epochta", "NOT_ALLOWED", None, "rejected", True),
    ("epochta", "INVALID_DESTINATION_ADDRESS", None, "rejected", True),
    ("epochta", "INVALID_SOURCE_ADDRESS", None, "rejected", True),
    ("epochta", "NOT_ENOUGH_CREDITS", None, "rejected", True),
]


@pytest.mark.parametrize(("provider", "raw", "error", "status", "final"), ROWS)
def test_row(provider: str, raw: str, error: str | None, status: str, final: bool) -> None:
    assert (status, final) == (
        normalise(provider, raw, error).status,
        normalise(provider, raw, error).final,
    )


def test_every_table_entry_is_covered_by_a_row() -> None:
    covered = {(provider, raw) for provider, raw, *_ in ROWS}
    table = {(p, raw) for p, rows in statuses.TABLES.items() for raw in rows}
    assert table == covered
    assert set(statuses.PROVIDERS) == set(statuses.TABLES)


@pytest.mark.parametrize("provider", statuses.PROVIDERS)
def test_an_unmapped_raw_value_is_a_non_final_unknown(provider: str) -> None:
    assert ("unknown", False) == (
        normalise(provider, "no-such-status").status,
        normalise(provider, "no-such-status").final,
    )


def test_error_code_zero_or_blank_is_no_error() -> None:
    assert [None, None, None, "600"] == [
        statuses.normalise_error_code(raw) for raw in (None, "", "0", "600")
    ]
