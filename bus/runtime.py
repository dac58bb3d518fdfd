"""What one smsbus process holds: the embedded server (if any), the NATS connection, the stream,
the spool and the publisher. Opened once at start, closed in reverse order at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from bus.config import Settings, redact_url
from bus.errors import StartupError
from bus.index import MessageIndex
from bus.metrics import Metrics
from bus.nats_server import EmbeddedNats
from bus.projector import Projector, bucket_names, ensure_bucket
from bus.publisher import Publisher
from bus.spool import Spool
from bus.stream import ensure_stream, stream_exists

log = structlog.get_logger("smsbus.runtime")

CONNECT_TIMEOUT = 5.0
READINESS_CACHE = 1.0


@dataclass
class ProviderState:
    """What /readyz says of a provider."""

    enabled: bool = False
    leader: bool = False
    last_success: str | None = None
    last_error: str | None = None


@dataclass
class Readiness:
    ready: bool
    reason: str
    checked: float = field(default_factory=time.monotonic)


async def connect_nats(
    settings: Settings,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    **callbacks: Any,
) -> NATS:
    """Connect to SMSBUS_NATS_URL (or the embedded server); one clear error if it cannot.

    Once connected the client reconnects forever; the first connection must succeed within
    CONNECT_TIMEOUT, since a wrong URL at start is a configuration problem.
    """
    urls = list(settings.effective_nats_urls)
    shown = ", ".join(redact_url(u) for u in urls)
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        if error_cb is not None:
            await error_cb(exc)

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers=urls,
                name="smsbus",
                connect_timeout=CONNECT_TIMEOUT,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                ping_interval=10,
                max_outstanding_pings=2,
                error_cb=on_error,
                **callbacks,
            ),
            CONNECT_TIMEOUT,
        )
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        variable = "SMSBUS_NATS_URL" if settings.nats_urls else "SMSBUS_EMBEDDED_NATS_PORT"
        last = errors[-1] if errors else exc
        reason = str(last) or type(last).__name__
        raise StartupError(f"{variable}: cannot reach NATS at {shown}: {reason}") from None


def check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(f"SMSBUS_DATA_DIR: {path} is not writable: {exc.strerror}") from None


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        # smspilot's callbacks are always received; the others are on with their credentials.
        self.providers: dict[str, ProviderState] = {
            name: ProviderState(enabled=name == "smspilot" or p.enabled)
            for name, p in settings.providers.items()
        } or {"smspilot": ProviderState(enabled=True)}
        self.embedded: EmbeddedNats | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._spool: Spool | None = None
        self._publisher: Publisher | None = None
        self._readiness = Readiness(False, "starting", checked=0.0)
        self.messages: KeyValue | None = None
        self.cursors: KeyValue | None = None
        self.projector: Projector | None = None
        self.index: MessageIndex | None = None
        self._closing = False

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "runtime not started"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "runtime not started"
        return self._js

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None, "runtime not started"
        return self._publisher

    async def start(self) -> None:
        s = self.settings
        check_data_dir(s.data_dir)
        if s.embedded:
            self.embedded = EmbeddedNats(s.embedded_nats_port, s.data_dir / "nats")
            await self.embedded.start()
            log.info("embedded nats-server started", url=self.embedded.url)
        self._nc = await connect_nats(
            s,
            error_cb=self._on_nats_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._js = self._nc.jetstream(timeout=CONNECT_TIMEOUT)
        try:
            await ensure_stream(self._js, s.stream, s.subject_prefix, s.stream_replicas)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StartupError(
                f"SMSBUS_STREAM: cannot create or update {s.stream}: {exc}"
            ) from None
        self._spool = Spool(s.data_dir / "spool.sqlite3", on_depth=self.metrics.spool_depth.set)
        await self._spool.open()
        self._publisher = Publisher(
            self._nc, self._js, self._spool, self.metrics, s.publish_timeout
        )
        self._publisher.start()
        messages, cursors = bucket_names(s.stream)
        try:
            self.messages = await ensure_bucket(self._js, messages, s.stream_replicas)
            self.cursors = await ensure_bucket(self._js, cursors, s.stream_replicas)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StartupError(
                f"SMSBUS_STREAM: cannot set up the key-value buckets: {exc}"
            ) from None
        self.index = MessageIndex(
            self.messages, on_open=lambda p, n: self.metrics.tracked.labels(p).set(n)
        )
        try:
            await self.index.start()
        except (TimeoutError, nats.errors.Error) as exc:
            raise StartupError(f"SMSBUS_STREAM: cannot watch the message state: {exc}") from None
        self.projector = Projector(
            self._js, self.messages, self._publisher, s.stream, s.subject_prefix, self.index
        )
        try:
            await self.projector.start()
        except (TimeoutError, nats.errors.Error) as exc:
            raise StartupError(
                f"SMSBUS_STREAM: cannot set up the projector consumer: {exc}"
            ) from None
        log.info(
            "bus ready",
            nats=", ".join(redact_url(u) for u in s.effective_nats_urls),
            stream=s.stream,
            spool_depth=self._spool.depth,
        )

    async def stop(self) -> None:
        """Flush what can be flushed, then close everything, in reverse order of start."""
        flush_timeout = self.settings.publish_timeout + 3.0
        if self.index is not None:
            await self.index.stop()
        if self.projector is not None:
            await self.projector.stop()
        if self._publisher is not None:
            await self._publisher.stop(flush_timeout)
        self._closing = True
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await asyncio.wait_for(self._nc.close(), 5.0)
        if self.embedded is not None:
            await self.embedded.stop()
        if self._spool is not None:
            await self._spool.close()

    async def __aenter__(self) -> Runtime:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def readiness(self) -> Readiness:
        """NATS connected, and the stream present (that look-up cached for a second)."""
        if self._nc is None or not self._nc.is_connected:
            self._readiness = Readiness(False, "NATS is not connected", checked=0.0)
            return self._readiness
        if time.monotonic() - self._readiness.checked < READINESS_CACHE:
            return self._readiness
        try:
            present = await asyncio.wait_for(stream_exists(self.js, self.settings.stream), 2.0)
        except (TimeoutError, nats.errors.Error) as exc:
            self._readiness = Readiness(False, f"stream check failed: {type(exc).__name__}")
            return self._readiness
        if present:
            self._readiness = Readiness(True, "ok")
        else:
            self._readiness = Readiness(False, f"stream {self.settings.stream} is missing")
        return self._readiness

    async def _on_nats_error(self, exc: Exception) -> None:
        log.warning("nats error", error=str(exc) or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("nats disconnected")

    async def _on_reconnected(self) -> None:
        url = self.nc.connected_url
        log.info("nats reconnected", url=redact_url(url.geturl()) if url else None)
        if self._js is not None:
            # A restarted server may have lost the stream (e.g. a fresh memory-only test server).
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError, StartupError):
                s = self.settings
                await ensure_stream(self._js, s.stream, s.subject_prefix, s.stream_replicas)
        if self._publisher is not None:
            self._publisher.wake()
