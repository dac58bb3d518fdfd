"""The OpenAPI 3.1 description of the HTTP API, served at `/openapi.json` (private listener).

The paths and their descriptions are written here from CONTRACT.md section 3, each marked with
the listener that serves it (`x-listeners`), so that `tests/test_openapi.py` can hold them to the
routes each listener really serves; the request and answer shapes come from bus.shapes, the same
models that validate the input. schemathesis holds the live service to the result.
"""

from __future__ import annotations

from typing import Any

from bus.shapes import components
from bus.statuses import PROVIDERS
from receiver.http import BODY_LIMIT, REGISTRATION_BODY_LIMIT
from receiver.smspilot import BLANK
from receiver.smspilot import PATH as CALLBACK

_BLANKS = "[" + BLANK.encode("unicode_escape").decode("ascii") + "]*"  # what parse_callback strips

PUBLIC, PRIVATE = "public", "private"


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


def _callback(with_token: bool) -> dict[str, Any]:
    fields = {
        "server_id": {"type": "string", "pattern": f"^{_BLANKS}[0-9]{{1,20}}{_BLANKS}$"},
        "status": {"type": "string", "pattern": f"^{_BLANKS}-?[0-9]{{1,4}}{_BLANKS}$"},
        "error": {"type": "string", "pattern": f"^{_BLANKS}([0-9]{{1,6}})?{_BLANKS}$"},
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
        "413": _text(
            f"the body is over {BODY_LIMIT} bytes, or the event would be more than the NATS "
            "server takes (its max_payload); kept on sms.deadletter.smspilot"
        ),
        "503": _text("neither the stream nor the spool took the event; SMSPilot retries"),
    }
    query = [
        {"name": name, "in": "query", "required": name in required, "schema": schema}
        for name, schema in fields.items()
    ]
    form = {"type": "object", "required": required, "properties": fields}
    return {
        "x-listeners": [PUBLIC],
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
            "x-listeners": [PUBLIC, PRIVATE],
            "get": {
                "summary": "Liveness; never depends on NATS or providers",
                "operationId": "healthz",
                "responses": {"200": _json("alive", "Health")},
            },
        },
        "/readyz": {
            "x-listeners": [PUBLIC],
            "get": {
                "summary": "Readiness: NATS connected and the stream present",
                "operationId": "readyz",
                "responses": {
                    "200": _json("ready", "Readiness"),
                    "503": _json("not ready; `reason` says why", "Readiness"),
                },
            },
        },
        "/metrics": {
            "x-listeners": [PUBLIC],
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {"200": _text("Prometheus text format 0.0.4")},
            },
        },
        "/openapi.json": {
            "x-listeners": [PRIVATE],
            "get": {
                "summary": "This description",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            },
        },
    }


def _messages() -> dict[str, Any]:
    return {
        "/v1/messages": {
            "x-listeners": [PRIVATE],
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
                    "202": _json("every item's state is stored", "Accepted"),
                    "400": _json(
                        "nothing was applied; each bad item is named", "RegistrationErrors"
                    ),
                    "413": _text(f"the body is over {REGISTRATION_BODY_LIMIT} bytes"),
                    "503": _json("the registrations could not be stored; retry", "Error"),
                },
            },
        },
        "/v1/messages/{provider}/{message_id}": {
            "x-listeners": [PRIVATE],
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
                        "description": "for SMS-Pager and SMSC, `<id>` or `<id>/<phone>`",
                        "schema": {"type": "string", "minLength": 1},
                    },
                ],
                "responses": {
                    "200": _json("the state", "MessageView"),
                    "404": _json("unknown provider or message", "Error"),
                    "503": _json("the state store is unavailable; retry", "Error"),
                },
            },
        },
    }


def openapi(*, receive: bool = True, version: str = "0") -> dict[str, Any]:
    """The description of what this process serves (`receive=False`: `serve --pollers-only`)."""
    paths = _operations()
    if receive:
        paths |= {CALLBACK: _callback(False), CALLBACK + "/{token}": _callback(True)}
        paths |= _messages()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smsbus",
            "version": version,
            "description": "SMS delivery reports as CloudEvents on NATS JetStream.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": components()},
    }


def listener_paths(description: dict[str, Any], listener: str) -> dict[str, Any]:
    """The part of a description that one listener serves."""
    return {
        path: item
        for path, item in description["paths"].items()
        if listener in item.get("x-listeners", ())
    }
