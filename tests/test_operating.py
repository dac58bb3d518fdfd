"""Operating smsbus: the alerting rules pass promtool's unit tests, the Prometheus Operator copy
and the dashboard are what their sources make, and a real Prometheus scraping a live smsbus
under a little load evaluates every dashboard query and every rule, each naming metrics that
exist, and counts delivery times once per message."""

from __future__ import annotations

import importlib.util
import itertools
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.fakes.server import Served
from tests.fakes.smstower import FakeSmstower, msk_now
from tests.support import NatsServer, Smsbus, free_port, isolated_env, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "smsbus-rules.yaml"
_ids = itertools.count(random.randrange(10**9, 10**10))


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: it comes from Debian's `prometheus` package "
            "(sudo apt-get install prometheus); .ci/run installs it when it is missing"
        )
    return found


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                             text=True)  # fmt: skip
    assert 0 == checked.returncode, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "rules-tests.yaml"], cwd=RULES.parent, capture_output=True,
        text=True,
    )  # fmt: skip
    assert 0 == tested.returncode, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_rule_has_a_unit_test_that_fires_it() -> None:
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((RULES.parent / "rules-tests.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert rules == fired


def test_the_operator_rule_and_the_dashboard_are_made_from_their_sources() -> None:
    operator = load(DEPLOY / "prometheus" / "operator_rule.py")
    assert operator.TARGET.read_text() == operator.render(), "run `make rules`"
    [document] = [d for d in yaml.safe_load_all(operator.TARGET.read_text()) if d]
    assert yaml.safe_load(RULES.read_text()) == document["spec"]
    dashboard = load(DEPLOY / "grafana" / "build.py")
    assert dashboard.TARGET.read_text() == dashboard.render(), "run `make dashboard`"


class Prometheus:
    """A real Prometheus (Debian's package) scraping one target every second."""

    def __init__(self, root: Path, target: str) -> None:
        self.root, self.port = root, free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "smsbus", "static_configs": [{"targets": [target]}]}],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Prometheus:
        with (self.root / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_for(self._ready, timeout=30, what="Prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series `expr` returns now; fails on a query Prometheus refuses."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert "success" == body["status"], f"{expr}: {body.get('error')}"
        return list(body["data"]["result"])

    def rules(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]


@pytest.fixture()
def loaded(nats_server: NatsServer, tmp_path: Path) -> Iterator[tuple[Smsbus, FakeSmstower]]:
    """A live smsbus with SMSTOWER polled (one message delivered, one never known, so it
    expires), a delivered SMSPilot callback of a registered message, and a malformed one."""
    tower = FakeSmstower(balance="10654")
    with Served(tower.app) as served:
        env = isolated_env(nats_server.url, **tower.settings(served.url), SMSBUS_TRACK_TTL="3")
        bus = Smsbus(env, tmp_path / "bus").start()
        try:
            delivered, unknown, pilot = (str(next(_ids)) for _ in range(3))
            tower.statuses[delivered] = ("delivered", msk_now())
            bus.register(
                {"provider": "smstower", "message_id": delivered},
                {"provider": "smstower", "message_id": unknown},
                {"provider": "smspilot", "message_id": pilot},
            )
            ok = httpx.get(f"{bus.base}/callbacks/smspilot",
                           params={"server_id": pilot, "status": "2"})  # fmt: skip
            assert (200, "OK") == (ok.status_code, ok.text)
            again = httpx.get(f"{bus.base}/callbacks/smspilot",
                              params={"server_id": pilot, "status": "2"})  # fmt: skip
            assert (200, "OK") == (again.status_code, again.text)  # the same fact: counted once
            bad = httpx.get(f"{bus.base}/callbacks/smspilot", params={"server_id": "x"})
            assert 400 == bad.status_code
            wait_for(lambda: bus.metric("smsbus_expired_total", provider="smstower") >= 1,
                     timeout=20, what="the unknown message to expire")  # fmt: skip
            yield bus, tower
        finally:
            assert 0 == bus.stop()


@pytest.mark.slow
def test_a_real_prometheus_evaluates_every_panel_and_every_rule(
    loaded: tuple[Smsbus, FakeSmstower], tmp_path: Path
) -> None:
    bus, _ = loaded
    dashboard = load(DEPLOY / "grafana" / "build.py")
    with Prometheus(tmp_path, bus.base.removeprefix("http://")) as prometheus:
        # Enough samples for rates over 30 s windows.
        wait_for(lambda: prometheus.query("count_over_time(smsbus_spool_depth[30s]) >= 5"),
                 timeout=60, what="five scrapes of smsbus")  # fmt: skip
        empty = [
            expr
            for expr in dashboard.expressions()
            if not prometheus.query(expr.replace("$__rate_interval", "30s"))
        ]
        assert [] == empty, "dashboard queries that return no series"

        # Each rule: loaded and evaluated without an error, and every selector in it names
        # series that exist (the comparisons keep an alert quiet, not its metrics absent).
        rules = {rule["name"]: rule for rule in prometheus.rules()}
        source = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
        assert {r["alert"] for r in source} == set(rules)

        def evaluated() -> bool:
            return all(r.get("lastEvaluation", "").startswith("2") for r in prometheus.rules())

        wait_for(evaluated, timeout=20, what="every rule evaluated")
        for rule in prometheus.rules():
            assert "ok" == rule["health"], (rule["name"], rule.get("lastError"))
        missing = [
            (rule["alert"], selector)
            for rule in source
            for selector in selectors(rule["expr"])
            if not prometheus.query(selector)
        ]
        assert [] == missing, "rule selectors with no series"

        # Delivery times: one per message, the repeated callback not counted again.
        counts = {
            (s["metric"]["provider"], s["metric"]["status"]): float(s["value"][1])
            for s in prometheus.query("smsbus_delivery_seconds_count")
        }
        assert {("smstower", "delivered"): 1, ("smstower", "unknown"): 1,
                ("smspilot", "delivered"): 1} == counts  # fmt: skip


def selectors(expr: str) -> list[str]:
    """The vector selectors of a PromQL expression: `metric` or `metric{matchers}`."""
    found = re.findall(r"\b(smsbus_[a-z_]+)(\{[^}]*\})?", expr)
    return [name + matchers for name, matchers in found]


def test_selectors_are_read_out_of_an_expression() -> None:
    expr = 'sum by (p) (rate(smsbus_x_total{outcome="ok"}[5m])) > 0 unless smsbus_y == 1'
    assert ['smsbus_x_total{outcome="ok"}', "smsbus_y"] == selectors(expr)
