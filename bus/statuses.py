"""Every provider's raw delivery statuses, normalised (CONTRACT.md section 5), as data.

Look-ups never raise: a raw value missing from a table is a non-final `unknown`, and the raw value
always travels beside the normalised one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

NOT_FINAL = frozenset({"queued", "scheduled", "sent"})
FINAL = frozenset({"delivered", "read", "undelivered", "expired", "rejected", "cancelled"})
UNKNOWN = "unknown"

PROVIDERS = ("smspilot", "smstower", "smspager", "smsc", "epochta")

TABLES: dict[str, dict[str, str]] = {
    # smspilot.txt 2.4 "Коды статуса SMS" (and the callback's `status`).
    "smspilot": {
        "-2": "rejected",
        "-1": "undelivered",
        "0": "queued",
        "1": "sent",
        "2": "delivered",
        "3": "scheduled",
    },
    # smstower.txt "Статусы доставки" (`deliveryStatus`).
    "smstower": {
        "processing": "sent",
        "delivered": "delivered",
        "undelivered": "undelivered",
    },
    # smspager.txt: the groups of the detailed report's <detail> block.
    "smspager": {
        "waiting": "queued",
        "onModer": "queued",
        "enqueued": "sent",
        "delivered": "delivered",
        "notDelivered": "undelivered",
        "cancel": "cancelled",
    },
    # smsc.txt: `status` of the get_messages history.
    "smsc": {
        "-3": UNKNOWN,
        "-2": "cancelled",
        "-1": "queued",
        "0": "sent",
        "1": "delivered",
        "2": "read",
        "3": "expired",
        "4": "read",
        "20": "undelivered",
        "25": "undelivered",
        "22": "rejected",
        "23": "rejected",
        "24": "rejected",
    },
    # epochta.txt "Получение статуса сообщения".
    "epochta": {
        "SENT": "sent",
        "DELIVERED": "delivered",
        "NOT_DELIVERED": "undelivered",
        "NOT_ALLOWED": "rejected",
        "INVALID_DESTINATION_ADDRESS": "rejected",
        "INVALID_SOURCE_ADDRESS": "rejected",
        "NOT_ENOUGH_CREDITS": "rejected",
    },
}

# SMSC -3 ("message not found": it will never be known) is the one raw `unknown` that is final.
FINAL_UNKNOWN: dict[str, frozenset[str]] = {"smsc": frozenset({"-3"})}

# SMSPilot refines an undelivered (-1) report by its error code.
SMSPILOT_UNDELIVERED_BY_ERROR = {"600": "expired", "603": "rejected", "604": "cancelled"}

# smspilot.txt section 6, the error table (its English texts).
SMSPILOT_ERRORS = {
    "204": "FROM not found",
    "210": "TO is required",
    "211": "TO is invalid",
    "212": "TO is deprecated",
    "213": "Unsupported zone",
    "220": "TEXT is required",
    "221": "TEXT too long",
    "230": "ID is invalid",
    "231": "PACKET_ID is invalid",
    "240": "Invalid INPUT list",
    "241": "You don't have enough money",
    "242": "SMS count limit (trial)",
    "243": "Loop protection",
    "250": "SEND_DATETIME is invalid",
    "260": "Invalid callback URL",
    "270": "Invalid ttl",
    "302": "SMS server_id not found",
    "303": "Invalid SMS check list",
    "304": "SERVER_PACKET_ID is invalid",
    "400": "User not found",
    "401": "Invalid login details",
    "500": "Invalid -since- format, right is YYYY-MM-DD HH:ll:SS",
    "600": "Expired",
    "601": "Undeliverable",
    "602": "Destination unreachable",
    "603": "Rejected",
    # Not in the document's table, but its status table maps it (-1 with 604: cancelled).
    "604": "Cancelled",
}


@dataclass(frozen=True)
class Normalised:
    status: str
    final: bool


@functools.lru_cache(maxsize=4096)  # a value (frozen), asked for again and again on every path
def normalise(provider: str, raw_status: str, error_code: str | None = None) -> Normalised:
    """The normalised status of a provider's raw status (and, for SMSPilot, error code)."""
    status = TABLES[provider].get(raw_status, UNKNOWN)
    if provider == "smspilot" and status == "undelivered" and error_code:
        status = SMSPILOT_UNDELIVERED_BY_ERROR.get(error_code, status)
    if status == UNKNOWN:
        return Normalised(UNKNOWN, raw_status in FINAL_UNKNOWN.get(provider, frozenset()))
    return Normalised(status, status in FINAL)


def normalise_error_code(raw: str | None) -> str | None:
    """A provider error code as the event carries it: null when absent or zero."""
    if raw is None:
        return None
    raw = raw.strip()
    if raw in ("", "0"):
        return None
    return raw
