"""Write smsbus.json, the Grafana dashboard, from the panel list below: `make dashboard`.

The test suite runs a real Prometheus against a live smsbus and evaluates every panel's queries
through its HTTP API (each must parse and return series), and checks smsbus.json is what this
script writes. Queries use `$__rate_interval`, which Grafana fills in; the test puts 30s there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "smsbus.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH, HEIGHT = 12, 8


@dataclass(frozen=True)
class Panel:
    title: str
    queries: list[tuple[str, str]]  # (expression, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    stack: bool = False
    extra: dict[str, object] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Callbacks and the bus",
        [
            Panel(
                "Callbacks by outcome",
                [
                    (
                        "sum by (outcome) (rate(smsbus_callbacks_total[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                "reqps",
                "SMSPilot callbacks a second: published (acked by JetStream), spooled, duplicate "
                "(a fact already stored), and the refusals. `failed` is a 503 and should stay 0.",
                stack=True,
            ),
            Panel(
                "Publish latency (to the JetStream ack)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) "
                        "(rate(smsbus_publish_duration_seconds_bucket[$__rate_interval])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(smsbus_publish_duration_seconds_bucket[$__rate_interval])))",
                        "p99",
                    ),
                ],
                "s",
            ),
            Panel(
                "Spool depth and publish failures",
                [
                    ("sum by (instance) (smsbus_spool_depth)", "spooled {{instance}}"),
                    (
                        "sum by (instance) (rate(smsbus_publish_failures_total[$__rate_interval]))",
                        "failures/s {{instance}}",
                    ),
                ],
                description="Events acknowledged to a provider and waiting on a pod's disk for "
                "JetStream; they drain on their own once NATS takes them.",
            ),
            Panel(
                "Events stored, by type and provider",
                [
                    (
                        "sum by (type, provider) (rate(smsbus_events_published_total"
                        "[$__rate_interval]))",
                        "{{type}} {{provider}}",
                    )
                ],
                "ops",
                stack=True,
            ),
            Panel(
                "NATS connection and background tasks",
                [
                    ("min by (instance) (smsbus_nats_connected)", "NATS {{instance}}"),
                    ("min by (task) (smsbus_task_up)", "task {{task}}"),
                ],
                description="1 is up. A task at 0 is restarting or has stalled (see /readyz).",
            ),
            Panel(
                "Task restarts",
                [
                    (
                        "sum by (task) (increase(smsbus_task_restarts_total[$__rate_interval]))",
                        "{{task}}",
                    )
                ],
            ),
            Panel(
                "Free space in the data directory",
                [("min by (instance) (smsbus_data_dir_free_bytes)", "{{instance}}")],
                "bytes",
                "The spool's room while NATS is away, about 1 kB an event (and the embedded "
                "nats-server's store, if any). SmsbusDataDirFilling fires after 10 min under "
                "256 MiB.",
            ),
        ],
    ),
    (
        "Providers",
        [
            Panel(
                "Provider calls by outcome",
                [
                    (
                        "sum by (provider, outcome) (rate(smsbus_poll_requests_total"
                        "[$__rate_interval]))",
                        "{{provider}} {{outcome}}",
                    )
                ],
                "reqps",
            ),
            Panel(
                "Provider up (as its poller sees it)",
                [
                    (
                        "max by (provider) (smsbus_provider_up * on (instance, provider) "
                        "smsbus_poller_leader)",
                        "{{provider}}",
                    )
                ],
                description="1 after a successful call, 0 after a transport or auth failure.",
            ),
            Panel(
                "Poll leaders",
                [
                    ("sum by (provider) (smsbus_poller_leader)", "{{provider}}"),
                    ("max by (provider) (smsbus_provider_polled)", "{{provider}} enabled"),
                ],
                description="Exactly one replica should lead each enabled provider.",
            ),
            Panel(
                "Tracked messages still open",
                [("max by (provider) (smsbus_tracked_messages)", "{{provider}}")],
            ),
            Panel(
                "Balances",
                [("max by (provider, unit) (smsbus_provider_balance)", "{{provider}} {{unit}}")],
            ),
            Panel(
                "Dead letters and expiries",
                [
                    (
                        "sum by (provider) (rate(smsbus_deadletters_total[$__rate_interval]))",
                        "dead letters {{provider}}",
                    ),
                    (
                        "sum by (provider) (rate(smsbus_deadletters_dropped_total"
                        "[$__rate_interval]))",
                        "not kept {{provider}}",
                    ),
                    (
                        "sum by (provider) (rate(smsbus_expired_total[$__rate_interval]))",
                        "expired {{provider}}",
                    ),
                ],
                "ops",
                "Dead letters: `smsbus deadletters` lists them, `smsbus replay` feeds them again. "
                "Expired: tracked messages with no final status by SMSBUS_TRACK_TTL.",
            ),
        ],
    ),
    (
        "Delivery",
        [
            Panel(
                "Time to delivery, median and 90th percentile",
                [
                    (
                        "histogram_quantile(0.5, sum by (provider, le) (rate("
                        'smsbus_delivery_seconds_bucket{status="delivered"}[$__rate_interval])))',
                        "p50 {{provider}}",
                    ),
                    (
                        "histogram_quantile(0.9, sum by (provider, le) (rate("
                        'smsbus_delivery_seconds_bucket{status="delivered"}[$__rate_interval])))',
                        "p90 {{provider}}",
                    ),
                ],
                "s",
                "From sent_at (else the registration) to the first final status, per provider.",
            ),
            Panel(
                "Final statuses",
                [
                    (
                        "sum by (provider, status) (rate(smsbus_delivery_seconds_count"
                        "[$__rate_interval]))",
                        "{{provider}} {{status}}",
                    )
                ],
                "ops",
                "Tracked messages reaching their first final status, by that status "
                "(`unknown`: expired).",
                stack=True,
            ),
        ],
    ),
]


def _panel(panel: Panel, ident: int, x: int, y: int) -> dict[str, object]:
    custom: dict[str, object] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
    if panel.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": ident,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "multi"},
        },  # fmt: skip
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(panel.queries)
        ],  # fmt: skip
    }


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    ident, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": ident, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        ident, y = ident + 1, y + 1
        for n, panel in enumerate(row):
            panels.append(_panel(panel, ident, (n % 2) * WIDTH, y + (n // 2) * HEIGHT))
            ident += 1
        y += -(-len(row) // 2) * HEIGHT
    return {
        "title": "smsbus",
        "uid": "smsbus",
        "description": "SMS delivery reports on NATS: callbacks, the bus, providers, delivery.",
        "tags": ["smsbus", "sms", "nats"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
            ]
        },  # fmt: skip
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions() -> list[str]:
    return [expr for _, row in ROWS for panel in row for expr, _ in panel.queries]


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if TARGET.read_text() == render() else "smsbus.json is out of date")
    TARGET.write_text(render())
