"""The deployment files: every manifest validates offline against Kubernetes 1.29 and the newest
bundled schema (strict), the kustomization lists what exists, and the image runs as non-root."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.support import NatsServer, Smsbus, isolated_env, read_stream, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted(p for p in (DEPLOY / "k8s").glob("**/*.yaml") if p.name != "kustomization.yaml")
WORKLOADS = [
    DEPLOY / "k8s" / "deployment.yaml",
    DEPLOY / "k8s" / "statefulset" / "statefulset.yaml",
]
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
PROBE_PASSES = range(200, 400)  # an HTTP probe's success, to the kubelet


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path, version: str) -> None:
    for document in load(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_a_broken_manifest_is_rejected() -> None:
    [deployment] = load(DEPLOY / "k8s" / "deployment.yaml")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.29.0", strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    [kustomization] = load(DEPLOY / "k8s" / "kustomization.yaml")
    listed = set(kustomization["resources"])
    top = {p.name for p in MANIFESTS if p.parent == DEPLOY / "k8s"}
    assert top - {"secret.example.yaml"} == listed


def test_the_statefulset_variant_runs_the_same_pod_with_a_claim_for_the_spool() -> None:
    [kustomization] = load(DEPLOY / "k8s" / "statefulset" / "kustomization.yaml")
    assert ["..", "statefulset.yaml", "service.yaml"] == kustomization["resources"]
    assert "kind: Deployment" in kustomization["patches"][0]["patch"]  # deleted from the base
    [deployment] = load(DEPLOY / "k8s" / "deployment.yaml")
    [statefulset] = load(DEPLOY / "k8s" / "statefulset" / "statefulset.yaml")
    pod, stateful_pod = deployment["spec"]["template"], statefulset["spec"]["template"]
    volumes = pod["spec"].pop("volumes")
    assert [v for v in volumes if v["name"] != "smsbus-data"] == stateful_pod["spec"].pop("volumes")
    assert pod == stateful_pod
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert "smsbus-data" == claim["metadata"]["name"]


def test_the_grace_period_covers_the_spool_drain() -> None:
    [deployment] = load(DEPLOY / "k8s" / "deployment.yaml")
    [config] = load(DEPLOY / "k8s" / "configmap.yaml")
    pod = deployment["spec"]["template"]["spec"]
    drain = float(config["data"]["SMSBUS_DRAIN_TIMEOUT"])
    # preStop 5 s, in-flight callbacks up to 10 s, then the drain.
    assert pod["terminationGracePeriodSeconds"] >= 5 + 10 + drain


def test_smsbus_is_a_native_sidecar_probed_and_locked_down() -> None:
    [deployment] = load(DEPLOY / "k8s" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [sidecar] = pod["initContainers"]
    assert "Always" == sidecar["restartPolicy"]
    assert "/readyz" == sidecar["startupProbe"]["httpGet"]["path"]
    assert "/healthz" == sidecar["readinessProbe"]["httpGet"]["path"]
    assert "/healthz" == sidecar["livenessProbe"]["httpGet"]["path"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in [sidecar, *pod["containers"]]:
        security = container["securityContext"]
        assert (True, ["ALL"], False) == (
            security["readOnlyRootFilesystem"],
            security["capabilities"]["drop"],
            security["allowPrivilegeEscalation"],
        )
    assert pod["terminationGracePeriodSeconds"] >= 10 + 2 + 3 + 5  # callback + flush + preStop


@pytest.mark.slow
def test_a_pod_stays_in_its_services_while_nats_is_away_but_does_not_start_without_it(
    tmp_path: Path,
) -> None:
    """The sidecar's readiness is the pod's: a NATS outage that made it fail would take every
    pod out of every Service, its app's own too, and the ingress would refuse the callbacks
    that the spool is there to take. Its startup probe does wait for NATS, so that a pod started
    during an outage (a rollout) does not replace a running one. The probes as both manifests
    give them, asked of a real smsbus whose NATS is killed and started again."""
    paths: dict[str, set[str]] = {}
    for workload in WORKLOADS:
        [manifest] = load(workload)
        [sidecar] = manifest["spec"]["template"]["spec"]["initContainers"]
        [port] = sidecar["ports"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = sidecar[kind]["httpGet"]
            assert port["name"] == probe["port"]
            paths.setdefault(kind, set()).add(probe["path"])
    probes = {kind: path for kind, (path,) in paths.items()}  # the same in both
    nats = NatsServer(tmp_path / "nats").start()
    bus = Smsbus(isolated_env(nats.url, SMSBUS_PUBLISH_TIMEOUT="1"), tmp_path / "data")
    try:
        bus.start()
        with httpx.Client(base_url=bus.base, timeout=10) as client:

            def passing() -> set[str]:
                return {
                    k for k, path in probes.items() if client.get(path).status_code in PROBE_PASSES
                }

            assert set(probes) == passing()
            nats.kill()
            wait_for(lambda: not bus.ready(), what="smsbus to see NATS gone")
            bus.callback(client, "4100000001")  # answered from the spool
            assert 1 == bus.spool_depth()
            assert {"readinessProbe", "livenessProbe"} == passing()
            nats.start()
            wait_for(lambda: bus.spool_depth() == 0, timeout=20, what="the spool to drain")
            assert set(probes) == passing()
        stored = read_stream(nats.url, bus.stream, f"{bus.prefix}.status.>")
        assert ["4100000001"] == [s.event["data"]["message_id"] for s in stored]
        assert 0 == bus.stop()
    finally:
        if bus.proc is not None:
            bus.kill()
        nats.stop()


def test_dockerfile_installs_the_project_and_runs_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]:
        assert f"COPY {package} ./{package}" in text
    assert "pip install --no-cache-dir ." in text
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["smsbus"]' in text and 'CMD ["serve"]' in text


def test_only_the_public_port_is_reachable_and_only_from_ingress_and_monitoring() -> None:
    [policy] = load(DEPLOY / "k8s" / "networkpolicy.yaml")
    [config] = load(DEPLOY / "k8s" / "configmap.yaml")
    [service] = load(DEPLOY / "k8s" / "service.yaml")
    [deployment] = load(DEPLOY / "k8s" / "deployment.yaml")
    public, private = config["data"]["SMSBUS_HTTP_PORT"], config["data"]["SMSBUS_API_PORT"]
    assert "127.0.0.1" == config["data"]["SMSBUS_API_HOST"] and public != private
    [rule] = policy["spec"]["ingress"]
    assert [int(public)] == [p["port"] for p in rule["ports"]]
    sources = [s["namespaceSelector"]["matchLabels"] for s in rule["from"]]
    assert 2 == len(sources) and all(len(s) == 1 for s in sources)  # no open `from`
    assert ["callbacks"] == [p["targetPort"] for p in service["spec"]["ports"]]
    [app] = deployment["spec"]["template"]["spec"]["containers"]
    [url] = [e["value"] for e in app["env"] if e["name"] == "SMSBUS_URL"]
    assert f"http://127.0.0.1:{private}" == url


def test_the_callback_route_is_served_over_plain_http_without_a_redirect() -> None:
    """SMSPilot's API refuses an https callback URL (its error 260, "Invalid callback URL"):
    the Ingress serves the route over HTTP and never redirects it to HTTPS (a redirect is not
    `OK`, so SMSPilot would keep calling), and every document names an http callback URL."""
    [ingress] = load(DEPLOY / "k8s" / "ingress.yaml")
    annotations = ingress["metadata"]["annotations"]
    for redirect in ("ssl-redirect", "force-ssl-redirect"):
        assert "false" == annotations[f"nginx.ingress.kubernetes.io/{redirect}"]
    [rule] = ingress["spec"]["rules"]
    assert ["/callbacks/smspilot"] == [p["path"] for p in rule["http"]["paths"]]
    for document in (
        DEPLOY.parent / "README.md",
        DEPLOY / "README.md",
        DEPLOY / "k8s" / "ingress.yaml",
    ):
        text = document.read_text()
        assert re.search(r"\bhttp://[^`\n]+/callbacks/smspilot", text), document
        assert not re.search(r"https://[^`\n]+/callbacks/smspilot", text), document
