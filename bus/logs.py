"""Logging: structlog, configured once by the entry point.

JSON lines when stdout is not a TTY (containers) or SMSBUS_LOG_FORMAT=json; a console renderer on a
TTY. Standard-library loggers (uvicorn, nats-py) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from bus.events import rfc3339


def _timestamp(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """RFC 3339 UTC with milliseconds; a third of structlog's ISO TimeStamper's cost."""
    event["timestamp"] = rfc3339(datetime.now(UTC))
    return event


def configure_logging(log_format: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    as_json = log_format == "json" or (log_format == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    renderer: Any
    factory: Any
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        # No local variables in tracebacks: they could hold a credential.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        factory = structlog.BytesLoggerFactory(stream.buffer)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        factory = structlog.WriteLoggerFactory(stream)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    if as_json:  # the stdlib handler below writes text
        renderer = structlog.processors.JSONRenderer()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)
