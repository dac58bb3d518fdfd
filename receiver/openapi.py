"""The OpenAPI 3.0 description of the HTTP API, served at `/openapi.json`.

Written by hand from CONTRACT.md section 3 rather than derived from the routes, so that
`tests/test_openapi.py` can hold the two against each other and schemathesis can hold the live
app to it.
"""

from __future__ import annotations

from typing import Any

from bus.messages import MAX_ITEMS
from bus.statuses import FINAL, NOT_FINAL, PROVIDERS, UNKNOWN
from receiver.http import BODY_LIMIT
from receiver.smspilot import PATH as CALLBACK

_STATUSES = sorted(FINAL | NOT_FINAL | {UNKNOWN})


def _text(description: str, enum: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {"description": description, "content": {"text/plain": {"schema": schema}}}


def _json(description: str, ref: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


# The JSON parser (orjson) takes integers from -2**63 to 2**64 - 1 and refuses others.
# One registration per provider, so that each provider's id rule is part of the schema.
_NUMERIC_ID = {
    "oneOf": [
        {"type": "string", "pattern": "^[0-9]{1,64}$"},
        {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    ]
}


def _text_id(longest: int) -> dict[str, Any]:
    """Any text without surrounding whitespace; a JSON number is taken as its digits."""
    text = {"type": "string", "pattern": r"^\S([\s\S]*\S)?$", "maxLength": longest}
    return {"oneOf": [text, {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}]}


_MESSAGE_IDS = {
    "smspilot": _NUMERIC_ID,
    "smstower": _NUMERIC_ID,
    "smsc": _NUMERIC_ID,
    "smspager": _text_id(21),
    "epochta": _text_id(64),
}
_PHONE = {
    "description": "5 to 20 digits; anything else in the text is dropped",
    "oneOf": [
        {"type": "string", "pattern": "^[^0-9]*([0-9][^0-9]*){5,20}$"},
        {"type": "integer", "minimum": 10000, "maximum": 2**64 - 1},
    ],
}


def _track_item(provider: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["provider", "message_id"],
        "properties": {
            "provider": {"type": "string", "enum": [provider]},
            "message_id": _MESSAGE_IDS[provider],
            "phone": _nullable(_PHONE),
            "client_ref": _nullable({"type": "string", "maxLength": 256}),
            "sent_at": _nullable({"type": "string", "format": "date-time"}),
        },
    }


def _schemas() -> dict[str, Any]:
    item_refs = [{"$ref": f"#/components/schemas/Track_{p}"} for p in PROVIDERS]
    return {
        **{f"Track_{p}": _track_item(p) for p in PROVIDERS},
        "TrackItem": {"oneOf": item_refs},
        "Registration": {
            "oneOf": [
                {"$ref": "#/components/schemas/TrackItem"},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_ITEMS,
                    "items": {"$ref": "#/components/schemas/TrackItem"},
                },
            ]
        },
        "Accepted": {
            "type": "object",
            "required": ["accepted"],
            "properties": {"accepted": {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS}},
        },
        "RegistrationErrors": {
            "type": "object",
            "required": ["errors"],
            "properties": {
                "errors": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["index", "error"],
                        "properties": {
                            "index": _nullable({"type": "integer", "minimum": 0}),
                            "error": {"type": "string"},
                        },
                    },
                }
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "MessageState": {
            "type": "object",
            "required": [
                "provider",
                "message_id",
                "status",
                "final",
                "provider_status",
                "phone",
                "client_ref",
                "updated_at",
            ],  # fmt: skip
            "properties": {
                "provider": {"type": "string", "enum": list(PROVIDERS)},
                "message_id": {"type": "string"},
                "status": _nullable({"type": "string", "enum": _STATUSES}),
                "final": {"type": "boolean"},
                "provider_status": _nullable({"type": "string"}),
                "phone": _nullable({"type": "string", "pattern": "^[0-9]*$"}),
                "client_ref": _nullable({"type": "string"}),
                "updated_at": _nullable({"type": "string", "format": "date-time"}),
            },
        },
        "Health": {
            "type": "object",
            "required": ["alive"],
            "properties": {"alive": {"type": "boolean", "enum": [True]}},
        },
        "Readiness": {
            "type": "object",
            "required": ["ready", "reason", "spool_depth", "providers"],
            "properties": {
                "ready": {"type": "boolean"},
                "reason": {"type": "string"},
                "spool_depth": {"type": "integer", "minimum": 0},
                "providers": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        p: {"$ref": "#/components/schemas/ProviderReadiness"} for p in PROVIDERS
                    },
                },
            },
        },
        "ProviderReadiness": {
            "type": "object",
            "required": ["enabled", "leader", "last_success", "last_error"],
            "properties": {
                "enabled": {"type": "boolean"},
                "leader": {"type": "boolean"},
                "last_success": _nullable({"type": "string", "format": "date-time"}),
                "last_error": _nullable({"type": "string"}),
            },
        },
    }


def _callback(with_token: bool) -> dict[str, Any]:
    fields = {
        "server_id": {"type": "string", "pattern": r"^\s*[0-9]{1,20}\s*$"},
        "status": {"type": "string", "pattern": r"^\s*-?[0-9]{1,4}\s*$"},
        "error": {"type": "string", "pattern": r"^\s*([0-9]{1,6})?\s*$"},
    }
    required = ["server_id", "status"]
    token = (
        [{"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}]
        if with_token
        else []
    )
    responses = {
        "200": _text("the status event is durable (stream or spool)", ["OK"]),
        "400": _text("malformed; the raw request went to sms.deadletter.smspilot"),
        "403": _text("the peer is not in SMSBUS_SMSPILOT_ALLOWED_IPS"),
        "404": _text(
            "no such token" if with_token else "tokens are configured and the path has none"
        ),
        "413": _text(f"the body is over {BODY_LIMIT} bytes"),
        "503": _text("neither the stream nor the spool took the event; SMSPilot retries"),
    }
    query = [
        {"name": name, "in": "query", "required": name in required, "schema": schema}
        for name, schema in fields.items()
    ]
    form = {"type": "object", "required": required, "properties": fields}
    return {
        "get": {
            "summary": "SMSPilot delivery report",
            "operationId": "smspilotCallbackGet" + ("Token" if with_token else ""),
            "parameters": token + query,
            "responses": responses,
        },
        "post": {
            "summary": "SMSPilot delivery report, form body (the query works too)",
            "operationId": "smspilotCallbackPost" + ("Token" if with_token else ""),
            "parameters": token,
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": form},
                    "multipart/form-data": {"schema": form},
                },
            },
            "responses": responses,
        },
    }


def _operations() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness; never depends on NATS or providers",
                "operationId": "healthz",
                "responses": {"200": _json("alive", "Health")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: NATS connected and the stream present",
                "operationId": "readyz",
                "responses": {
                    "200": _json("ready", "Readiness"),
                    "503": _json("not ready; `reason` says why", "Readiness"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {"200": _text("Prometheus text format 0.0.4")},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This description",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.0",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _messages() -> dict[str, Any]:
    return {
        "/v1/messages": {
            "post": {
                "summary": "Register sent messages for tracking (all or nothing)",
                "operationId": "registerMessages",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/Registration"}
                        }
                    },
                },
                "responses": {
                    "202": _json("durable in the stream (or the spool)", "Accepted"),
                    "400": _json(
                        "nothing was applied; each bad item is named", "RegistrationErrors"
                    ),
                    "413": _text(f"the body is over {BODY_LIMIT} bytes"),
                    "503": _json("the registrations could not be stored; retry", "Error"),
                },
            }
        },
        "/v1/messages/{provider}/{message_id}": {
            "get": {
                "summary": "A message's current state",
                "operationId": "showMessage",
                "parameters": [
                    {
                        "name": "provider",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": list(PROVIDERS)},
                    },
                    {
                        "name": "message_id",
                        "in": "path",
                        "required": True,
                        "description": "for SMS-Pager, `<smsid>` or `<smsid>/<phone>`",
                        "schema": {"type": "string", "minLength": 1},
                    },
                ],
                "responses": {
                    "200": _json("the state", "MessageState"),
                    "404": _json("unknown provider or message", "Error"),
                    "503": _json("the state store is unavailable; retry", "Error"),
                },
            }
        },
    }


def openapi(*, receive: bool = True, version: str = "0") -> dict[str, Any]:
    """The description of what this process serves (`receive=False`: `serve --pollers-only`)."""
    paths = _operations()
    if receive:
        paths |= {CALLBACK: _callback(False), CALLBACK + "/{token}": _callback(True)}
        paths |= _messages()
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "smsbus",
            "version": version,
            "description": "SMS delivery reports as CloudEvents on NATS JetStream.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": _schemas()},
    }
