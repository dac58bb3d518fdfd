"""Prometheus metrics (CONTRACT.md section 7), one registry per process.

Labels carry only fixed vocabularies (provider ids, outcomes, event types): never a token, a
message id or a phone number.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bus.events import TYPES
from bus.logs import LinesLost
from bus.statuses import PROVIDERS

CALLBACK_OUTCOMES = (
    "published",  # acknowledged by JetStream
    "spooled",  # kept in the local spool until NATS acks it
    "duplicate",  # a fact the message's state already records: OK, nothing stored again
    "malformed",  # 400, dead-lettered
    "too_large",  # 413
    "forbidden",  # 403, peer outside SMSBUS_SMSPILOT_ALLOWED_IPS
    "not_found",  # 404, missing or wrong token
    "bad_method",  # 405
    "failed",  # 503, not durable anywhere; SMSPilot will retry
)

POLL_OUTCOMES = ("ok", "unavailable", "auth_error", "bad_answer")
# Seconds to days: an SMS is delivered in seconds, a phone that is off for days gets it when it
# is on again, and tracking ends at SMSBUS_TRACK_TTL (3 days by default).
DELIVERY_BUCKETS = (
    1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
    2 * 86400, 3 * 86400, 7 * 86400,
)  # fmt: skip

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.callbacks = Counter(
            "smsbus_callbacks", "SMSPilot callbacks by outcome", ["outcome"], registry=r
        )
        self.requests_too_slow = Counter(
            "smsbus_http_requests_too_slow",
            "Connections closed because a request did not arrive whole within 10 s of its "
            "first byte (or nothing arrived within 10 s of the connection's start)",
            ["listener"],
            registry=r,
        )
        self.callbacks_in_flight = Gauge(
            "smsbus_callbacks_in_flight", "Callbacks received and not yet answered", registry=r
        )
        self.events_published = Counter(
            "smsbus_events_published",
            "Events acknowledged by JetStream",
            ["type", "provider"],
            registry=r,
        )
        self.publish_duration = Histogram(
            "smsbus_publish_duration_seconds",
            "Time from publish to JetStream ack",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.publish_failures = Counter(
            "smsbus_publish_failures",
            "Events that could not go to JetStream at once (a timeout, a refusal or NATS "
            "disconnected) and went to the spool",
            registry=r,
        )
        self.publish_batch = Histogram(
            "smsbus_publish_batch_events",
            "Events per JetStream round trip (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.states_owed = Counter(
            "smsbus_state_writes_owed",
            "Status events JetStream stored whose message state could not be written at once; "
            "the spool keeps each until its state is written",
            registry=r,
        )
        self.state_reads_failed = Counter(
            "smsbus_state_reads_failed",
            "Callbacks and polls that went on without a message's state because the bucket "
            "could not be read in time while NATS was connected (a callback's event waits in the "
            "spool for it; a poll's event lacks tracking data)",
            registry=r,
        )
        self.publish_resends = Counter(
            "smsbus_publish_resends",
            "Publishes sent again because JetStream was still storing the same fact "
            "(10158, duplicate message id is in process); not failures",
            registry=r,
        )
        self.state_batches = Counter(
            "smsbus_state_batches",
            "Atomic batches of message-state writes: stored, or refused as a whole (another "
            "writer got to a key first) or unanswered, then written again key by key",
            ["outcome"],
            registry=r,
        )
        for outcome in ("stored", "refused"):
            self.state_batches.labels(outcome)
        self.task_restarts = Counter(
            "smsbus_task_restarts",
            "Supervised background tasks restarted after they failed or stalled",
            ["task"],
            registry=r,
        )
        self.spool_depth = Gauge(
            "smsbus_spool_depth", "Events in the local spool awaiting a JetStream ack", registry=r
        )
        self.data_dir_free = Gauge(
            "smsbus_data_dir_free_bytes",
            "Free bytes on the disk of SMSBUS_DATA_DIR (the spool's; the embedded nats-server's "
            "store's too)",
            registry=r,
        )
        self.poll_requests = Counter(
            "smsbus_poll_requests",
            "Requests to providers by outcome",
            ["provider", "outcome"],
            registry=r,
        )
        self.provider_up = Gauge(
            "smsbus_provider_up",
            "1 after a successful provider call, 0 after an auth or transport failure",
            ["provider"],
            registry=r,
        )
        self.balance = Gauge(
            "smsbus_provider_balance", "Last balance read", ["provider", "unit"], registry=r
        )
        self.leader = Gauge(
            "smsbus_poller_leader",
            "1 while this process polls the provider",
            ["provider"],
            registry=r,
        )
        self.tracked = Gauge(
            "smsbus_tracked_messages",
            "Tracked messages with no final status yet",
            ["provider"],
            registry=r,
        )
        self.deadletters = Counter(
            "smsbus_deadletters", "Inputs sent to the dead-letter subject", ["provider"], registry=r
        )
        self.deadletters_dropped = Counter(
            "smsbus_deadletters_dropped",
            "Malformed requests answered but not kept: their peer passed SMSBUS_DEADLETTER_RATE",
            ["provider"],
            registry=r,
        )
        self.polled = Gauge(
            "smsbus_provider_polled",
            "1 for each provider this process polls when it holds the lease (enabled here)",
            ["provider"],
            registry=r,
        )
        self.expired = Counter(
            "smsbus_expired",
            "Tracked messages that reached SMSBUS_TRACK_TTL with no final status (final unknown)",
            ["provider"],
            registry=r,
        )
        self.delivery = Histogram(
            "smsbus_delivery_seconds",
            "From sent_at (else the registration) to a message's first final status, counted "
            "once per message by the replica that stores that state",
            ["provider", "status"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.nats_connected = Gauge(
            "smsbus_nats_connected", "1 while the NATS connection is up", registry=r
        )
        self.task_up = Gauge(
            "smsbus_task_up",
            "1 while a supervised background task runs, 0 while it restarts or has stalled",
            ["task"],
            registry=r,
        )
        self.poll_pace = Gauge(
            "smsbus_poll_pace",
            "Share of its concurrency a poller keeps: 1 at full pace, less while requests crowd in",
            registry=r,
        )
        r.register(LinesLost())  # smsbus_log_lines_lost_total
        self.before_render: Callable[[], None] = lambda: None  # refreshes the sampled gauges
        self._delivery: dict[tuple[str, str], Histogram] = {}
        # Labelled children resolved once: .labels() per call is measurable on the hot path.
        self.callback_outcome = {o: self.callbacks.labels(o) for o in CALLBACK_OUTCOMES}
        self.published = {
            (kind, provider): self.events_published.labels(kind, provider)
            for kind in TYPES
            for provider in PROVIDERS
        }
        for listener in ("public", "private"):
            self.requests_too_slow.labels(listener)
        for provider in PROVIDERS:
            self.deadletters.labels(provider)
            self.deadletters_dropped.labels(provider)
            self.tracked.labels(provider)
            self.leader.labels(provider)
            self.polled.labels(provider)
            self.expired.labels(provider)
            for outcome in POLL_OUTCOMES:
                self.poll_requests.labels(provider, outcome)

    def delivered(self, provider: str, status: str, seconds: float) -> None:
        """Observe smsbus_delivery_seconds (its children resolved once each: a poll answer can
        finish thousands of messages)."""
        child = self._delivery.get((provider, status))
        if child is None:
            child = self._delivery[(provider, status)] = self.delivery.labels(provider, status)
        child.observe(seconds)

    def render(self) -> bytes:
        self.before_render()
        return generate_latest(self.registry)
