"""What smsbus takes and gives over HTTP (and on `sms.track.*`), each shape defined once, as a
pydantic model: the same definition validates the input and writes the OpenAPI components
(receiver.openapi keeps only the paths and their descriptions).

A registration item is one model per provider (the provider is the discriminator), since each
provider's document has its own rule for message ids: SMSPilot, SMSTOWER and SMSC ids are whole
numbers, an SMS-Pager smsid is at most 21 characters. A type whose check is code rather than a
JSON Schema keyword carries its schema beside the check (`_checked`), in the one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.json_schema import models_json_schema

from bus.events import rfc3339
from bus.statuses import FINAL, NOT_FINAL, PROVIDERS, UNKNOWN

MAX_ITEMS = 1000
INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1  # what the JSON parser (orjson) takes
_ASCII_DIGITS = re.compile(r"[0-9]+")
STATUSES = sorted(FINAL | NOT_FINAL | {UNKNOWN})


class Invalid(ValueError):
    """A value refused with our own one-line reason (shown as is)."""


def digits(text: str) -> str:
    """Only the ASCII digits of a phone number (or any text)."""
    return "".join(ch for ch in text if "0" <= ch <= "9")


def _checked(check: Callable[[Any], Any], schema: dict[str, Any]) -> tuple[Any, Any]:
    """A field checked by code, with the JSON Schema that says the same."""
    return (BeforeValidator(check), WithJsonSchema(schema))


def _number_as_text(value: Any) -> Any:
    """A JSON number given for a text field, as its digits. JSON Schema counts 42.0 as an
    integer, so an integral float is taken the same way."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # exact; a larger float is an integer the parser could not keep
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _numeric_id(provider: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = _number_as_text(value)
        if not isinstance(value, str) or not value:
            raise Invalid("message_id is required (a string)")
        if len(value) > 64:
            raise Invalid("message_id is longer than 64 characters")
        if not _ASCII_DIGITS.fullmatch(value):
            raise Invalid(f"{provider} message ids are whole numbers")
        return value

    return check


# Whitespace by both definitions that judge an id: Python's (which counts \x1c-\x1f and \x85)
# and that of the description's JSON Schema pattern, ECMAScript's `\s` (which counts \ufeff).
_SPACE = r"\s\x1c-\x1f\x85\ufeff"
_ALL_SPACE = re.compile(rf"[{_SPACE}]*")
_EDGE_SPACE = re.compile(rf"^[{_SPACE}]|[{_SPACE}]$")


def _text_id(longest: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = _number_as_text(value)
        if not isinstance(value, str) or _ALL_SPACE.fullmatch(value):
            raise Invalid("message_id is required (a string)")
        if _EDGE_SPACE.search(value):
            raise Invalid("message_id has leading or trailing whitespace")
        if len(value) > longest:
            raise Invalid(f"message_id is longer than {longest} characters")
        return value

    return check


def _phone(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise Invalid("phone must hold 5 to 20 digits")
    value = _number_as_text(value)
    if not isinstance(value, str) or not 5 <= len(digits(value)) <= 20:
        raise Invalid("phone must hold 5 to 20 digits")
    return digits(value)


def _client_ref(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > 256):
        raise Invalid("client_ref must be a string of at most 256 characters")
    return value


# W3C Trace Context, version 00's form: not version ff, neither id all zeros (one pattern for
# the check and the schema).
TRACEPARENT_PATTERN = "^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$"
_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)


def valid_traceparent(value: str) -> bool:
    return _TRACEPARENT.fullmatch(value) is not None  # `$` alone would let a newline end it


def _traceparent(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not valid_traceparent(value)):
        raise Invalid("traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    return value


def _sent_at(value: Any) -> str | None:
    if value is None:
        return None
    return rfc3339(parse_rfc3339(value, "sent_at"))


def parse_rfc3339(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise Invalid(f"{name} must be an RFC 3339 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{name} is not RFC 3339 (e.g. 2026-11-22T10:00:00Z)") from None
    if moment.tzinfo is None:
        raise Invalid(f"{name} needs a time zone (e.g. Z or +03:00)")
    return moment


_INTEGER = {"type": "integer", "minimum": INT64_MIN, "maximum": UINT64_MAX}


def numeric_id(provider: str) -> tuple[Any, Any]:
    """Ids the provider's document calls numbers: digits, as text or as a JSON number."""
    schema = {
        "oneOf": [
            {"type": "string", "pattern": "^[0-9]{1,64}$"},
            {"type": "integer", "minimum": 0, "maximum": UINT64_MAX},
        ]
    }
    return _checked(_numeric_id(provider), schema)


def text_id(longest: int) -> tuple[Any, Any]:
    """Any text without surrounding whitespace (a JSON number is taken as its digits)."""
    edge = f"[^{_SPACE}]"
    text = {"type": "string", "pattern": rf"^{edge}([\s\S]*{edge})?$", "maxLength": longest}
    return _checked(_text_id(longest), {"oneOf": [text, _INTEGER]})


Phone = Annotated[
    str | None,
    *_checked(
        _phone,
        {
            "description": "5 to 20 digits; anything else in the text is dropped",
            "oneOf": [
                {"type": "string", "pattern": "^[^0-9]*([0-9][^0-9]*){5,20}$"},
                {"type": "integer", "minimum": 10000, "maximum": UINT64_MAX},
                {"type": "null"},
            ],
        },
    ),
]
ClientRef = Annotated[
    str | None,
    *_checked(_client_ref, {"anyOf": [{"type": "string", "maxLength": 256}, {"type": "null"}]}),
]
SentAt = Annotated[
    str | None,
    *_checked(_sent_at, {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}),
]

TraceParent = Annotated[
    str | None,
    *_checked(
        _traceparent,
        {
            "description": "W3C Trace Context: carried on this message's status events",
            "anyOf": [
                {
                    "type": "string",
                    "pattern": TRACEPARENT_PATTERN,
                },
                {"type": "null"},
            ],
        },
    ),
]


class _Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    phone: Phone = None
    client_ref: ClientRef = None
    sent_at: SentAt = None
    traceparent: TraceParent = None


class RegisterSmspilot(_Registration):
    """A sent SMSPilot message: `message_id` is its server_id."""

    provider: Literal["smspilot"]
    message_id: Annotated[str, *numeric_id("smspilot")]


class RegisterSmstower(_Registration):
    """A sent SMSTOWER message: `message_id` is its idMessage."""

    provider: Literal["smstower"]
    message_id: Annotated[str, *numeric_id("smstower")]


class RegisterSmsc(_Registration):
    """A sent SMSC message: `message_id` is its id."""

    provider: Literal["smsc"]
    message_id: Annotated[str, *numeric_id("smsc")]


class RegisterSmspager(_Registration):
    """A sent SMS-Pager mailing: `message_id` is its smsid ("not more than 21 characters")."""

    provider: Literal["smspager"]
    message_id: Annotated[str, *text_id(21)]


class RegisterEpochta(_Registration):
    """A sent ePochta message: `message_id` is its messageId."""

    provider: Literal["epochta"]
    message_id: Annotated[str, *text_id(64)]


Registration = Annotated[
    RegisterSmspilot | RegisterSmstower | RegisterSmsc | RegisterSmspager | RegisterEpochta,
    Field(discriminator="provider"),
]
REGISTRATION = TypeAdapter(Registration)


class Accepted(BaseModel):
    accepted: Annotated[int, Field(ge=1, le=MAX_ITEMS)]


class ItemError(BaseModel):
    index: Annotated[int, Field(ge=0)] | None
    error: str


class RegistrationErrors(BaseModel):
    errors: Annotated[list[ItemError], Field(min_length=1)]


class Error(BaseModel):
    error: str


class MessageView(BaseModel):
    """GET /v1/messages/<provider>/<message_id>[/<phone>]."""

    provider: Literal[PROVIDERS]  # type: ignore[valid-type]
    message_id: str
    status: Literal[tuple(STATUSES)] | None  # type: ignore[valid-type]
    final: bool
    provider_status: str | None
    phone: Annotated[str, Field(pattern="^[0-9]*$")] | None
    client_ref: str | None
    updated_at: datetime | None
    traceparent: str | None = None


class Health(BaseModel):
    alive: Literal[True]


class ProviderReadiness(BaseModel):
    enabled: bool
    leader: bool
    last_success: datetime | None
    last_error: str | None


class Readiness(BaseModel):
    ready: bool
    reason: str
    spool_depth: Annotated[int, Field(ge=0)]
    providers: dict[Literal[PROVIDERS], ProviderReadiness]  # type: ignore[valid-type]
    degraded: list[str]
    tasks: dict[str, dict[str, Any]]
    watches: dict[str, dict[str, Any]]


SHAPES: tuple[type[BaseModel], ...] = (
    RegisterSmspilot, RegisterSmstower, RegisterSmsc, RegisterSmspager, RegisterEpochta,
    Accepted, RegistrationErrors, Error, MessageView, Health, ProviderReadiness, Readiness,
)  # fmt: skip


def components() -> dict[str, Any]:
    """The OpenAPI 3.1 `components.schemas` of every shape (refs as `#/components/schemas/X`)."""
    ref = "#/components/schemas/{model}"
    _, models = models_json_schema([(m, "validation") for m in SHAPES], ref_template=ref)
    registration = REGISTRATION.json_schema(ref_template=ref)
    defs: dict[str, Any] = {**models.get("$defs", {}), **registration.pop("$defs", {})}
    defs["TrackItem"] = registration
    defs["Registration"] = {
        "oneOf": [
            {"$ref": "#/components/schemas/TrackItem"},
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_ITEMS,
                "items": {"$ref": "#/components/schemas/TrackItem"},
            },
        ]
    }
    return dict(sorted(defs.items()))


def reason(error: ValidationError) -> str:
    """One line for the first thing wrong with an item."""
    first = error.errors(include_url=False)[0]
    kind, where = first["type"], [str(part) for part in first["loc"]]
    field = where[-1] if where else ""
    if kind == "value_error" and isinstance(first.get("ctx", {}).get("error"), Invalid):
        return str(first["ctx"]["error"])
    if kind == "extra_forbidden":
        return f"unknown field {field!r}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"provider must be one of {', '.join(PROVIDERS)}"
    if kind == "model_type" or kind == "model_attributes_type":
        return "expected a JSON object"
    if kind == "missing":
        return f"{field} is required" + (" (a string)" if field == "message_id" else "")
    return f"{field}: {first['msg']}" if field else str(first["msg"])
