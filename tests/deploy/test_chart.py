"""The Helm chart, rendered offline by Helm's Go SDK for each supported mode and checked object by object."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
from prometheus_client import generate_latest

from celery_worker_operator.cli import run
from celery_worker_operator.metrics import PoolMetrics
from celery_worker_operator.policy import Decision, DecisionKind, Limit, Terms
from celery_worker_operator.spec import AutoscalingSpec
from celery_worker_operator.telemetry import EventAggregator

from .chart import CHART, COMBINATIONS, NAMESPACE, RELEASE, ROOT, chart_crds, manifests, of_kind, render

KUBE_VERSIONS = ["1.28", "1.37"]  # kubeVersion floor (the CRD uses CEL fieldPath, 1.28+), newest schemas
STANDARD_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
combinations = pytest.mark.parametrize("values", list(COMBINATIONS.values()), ids=list(COMBINATIONS))


@combinations
def test_chart_lints_strict(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


@combinations
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(values: dict[str, Any], kube_version: str) -> None:
    """Built-in kinds against Kubernetes' own schemas (no unknown fields); our CRDs' kinds against the CRD."""
    crd_schemas = {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"]): (
            version["schema"]["openAPIV3Schema"]
        )
        for crd in chart_crds()
        for version in crd["spec"]["versions"]
    }
    for obj in manifests(values):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in crd_schemas:
            jsonschema.validate(obj, crd_schemas[obj["apiVersion"], obj["kind"]])
        elif obj["kind"] in ("ServiceMonitor", "PrometheusRule"):
            continue  # prometheus-operator's CRDs ship no offline schema: see the tests of each below
        else:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")


def test_chart_crd_is_the_generated_one_byte_for_byte() -> None:
    generated = ROOT / "deploy" / "crds" / "celeryworkerpools.celery-operator.dev.yaml"
    assert (CHART / "crds" / generated.name).read_bytes() == generated.read_bytes(), "run: make crd, then copy"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_chart_crds_validate_strictly(kube_version: str) -> None:
    for crd in chart_crds():
        kubernetes_validate.validate(crd, kube_version, strict=True)


BAD_VALUES = {
    "two replicas without peering": {"replicaCount": 2},
    "namespace that is no DNS label": {"watch": {"clusterWide": False, "namespaces": ["Team_A"]}},
    "port out of range": {"metrics": {"port": 70000}},
    "unknown key (a typo)": {"metric": {"port": 9090}},
    "pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "scrape interval that is no duration": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "30 seconds"}}},
    "clusterWide as a string": {"watch": {"clusterWide": "yes"}},
    "log format the operator does not write": {"logFormat": "xml"},
    "log level in the wrong case": {"logLevel": "debug"},
    "volume mount without a path": {"extraVolumeMounts": [{"name": "ca"}]},
    "relabeling with a misspelled key": {
        "metrics": {"serviceMonitor": {"enabled": True, "relabelings": [{"sourcelabels": ["job"]}]}}
    },
    "runAsUser as a string": {"podSecurityContext": {"runAsUser": "10001"}},
    "readiness probe every 0 s": {"readinessProbe": {"periodSeconds": 0}},
}


@pytest.mark.parametrize("values", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_values_are_rejected_by_the_schema(values: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError, match="schema"):
        render(values)


@combinations
def test_every_object_has_the_standard_labels(values: dict[str, Any]) -> None:
    for obj in manifests(values):
        assert set(obj["metadata"]["labels"]) >= STANDARD_LABELS, obj["metadata"]["name"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def deployment(values: dict[str, Any]) -> dict[str, Any]:
    (found,) = of_kind(manifests(values), "Deployment")
    return found


@combinations
def test_operator_pod_is_locked_down(values: dict[str, Any]) -> None:
    pod = deployment(values)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


@combinations
def test_probe_and_ports_are_what_the_operator_is_told_to_serve(values: dict[str, Any]) -> None:
    (container,) = deployment(values)["spec"]["template"]["spec"]["containers"]
    args = dict(arg.removeprefix("--").partition("=")[::2] for arg in container["args"] if "=" in arg)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    liveness = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S+)", args["liveness"])
    assert liveness, args
    for kind in ("livenessProbe", "readinessProbe"):
        if kind in container:  # readiness may be turned off
            probe = container[kind]["httpGet"]
            assert (ports[probe["port"]], probe["path"]) == (int(liveness[1]), liveness[2]), kind
    assert ports["metrics"] == int(args["metrics-port"])
    (service,) = of_kind(manifests(values), "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics", "health"]


@combinations
def test_one_active_operator_at_a_time(values: dict[str, Any]) -> None:
    """Without peering: one replica, Recreate. With peering: the peering objects exist and `run` uses them."""
    objects = manifests(values)
    spec = deployment(values)["spec"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    peerings = of_kind(objects, "ClusterKopfPeering") + of_kind(objects, "KopfPeering")
    if values.get("peering", {}).get("enabled"):
        assert spec["strategy"]["type"] == "RollingUpdate"
        named = {f"--peering={p['metadata']['name']}" for p in peerings}
        assert named == {a for a in args if a.startswith("--peering")}
    else:
        assert (spec["replicas"], spec["strategy"]["type"], peerings) == (1, "Recreate", [])
        assert not any(a.startswith("--peering") for a in args), "without --peering, `run` is standalone"


@combinations
def test_the_operator_accepts_the_arguments_the_chart_passes(values: dict[str, Any]) -> None:
    args = deployment(values)["spec"]["template"]["spec"]["containers"][0]["args"]
    context = run.make_context("run", list(args))
    assert context.params["all_namespaces"] == values.get("watch", {}).get("clusterWide", True)
    assert context.params["log_level"] == values.get("logLevel", "INFO")
    assert context.params["log_format"] == values.get("logFormat", "text")


@combinations
def test_extra_env_volumes_and_security_contexts_reach_the_operator_container(values: dict[str, Any]) -> None:
    pod = deployment(values)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for item in values.get("extraEnv", []):
        assert item in container["env"]
    for item in values.get("extraVolumes", []):
        assert item in pod["volumes"]
    for item in values.get("extraVolumeMounts", []):
        assert item in container["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], "the only writable path stays"
    assert values.get("podSecurityContext", {}).items() <= pod["securityContext"].items(), "merged, not replaced"
    assert ("readinessProbe" in container) == values.get("readinessProbe", {}).get("enabled", True)


def test_helm_test_pod_runs_the_chart_check_as_the_operator_with_its_namespaces() -> None:
    for name, values in COMBINATIONS.items():
        objects = manifests(values)
        (test_pod,) = [o for o in objects if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
        operator_pod = deployment(values)["spec"]["template"]["spec"]
        assert test_pod["kind"] == "Pod" and test_pod["spec"]["restartPolicy"] == "Never", name
        assert test_pod["spec"]["serviceAccountName"] == operator_pod["serviceAccountName"], name
        (check,) = test_pod["spec"]["containers"]
        assert check["image"] == operator_pod["containers"][0]["image"], name
        assert check["command"] == ["python", "-c", (CHART / "files" / "helm-test.py").read_text()], name
        env = {item["name"]: item["value"] for item in check["env"]}
        args = operator_pod["containers"][0]["args"]
        namespaces = [a.removeprefix("--namespace=") for a in args if a.startswith("--namespace=")]
        assert env["WATCH_NAMESPACES"] == ",".join(namespaces), name  # empty: cluster-wide
        health_port = next(p["containerPort"] for p in operator_pod["containers"][0]["ports"] if p["name"] == "health")
        (service,) = of_kind(objects, "Service")
        default_url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{health_port}/healthz"
        assert env["OPERATOR_HEALTHZ_URL"] == values.get("tests", {}).get("healthzUrl", default_url), name


@combinations
def test_watched_namespaces_match_the_arguments(values: dict[str, Any]) -> None:
    args = deployment(values)["spec"]["template"]["spec"]["containers"][0]["args"]
    watch = values.get("watch", {})
    if watch.get("clusterWide", True):
        assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)
    else:
        expected = watch.get("namespaces") or [NAMESPACE]
        assert [a.removeprefix("--namespace=") for a in args if a.startswith("--namespace=")] == expected


@combinations
def test_service_monitor_only_when_enabled_and_it_scrapes_the_metrics_service(values: dict[str, Any]) -> None:
    objects = manifests(values)
    monitors = of_kind(objects, "ServiceMonitor")
    if not values.get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        assert monitors == []
        return
    (monitor,) = monitors
    (service,) = of_kind(objects, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0] | {"port": "metrics", "path": "/metrics"} == monitor["spec"]["endpoints"][0]
    assert monitor["metadata"]["labels"]["release"] == values["metrics"]["serviceMonitor"]["labels"]["release"]
    wanted = values["metrics"]["serviceMonitor"]
    for key in ("relabelings", "metricRelabelings"):
        assert monitor["spec"]["endpoints"][0].get(key) == (wanted.get(key) or None), key


SERIES = re.compile(r"\b(celery_\w+)")
SELECTOR = re.compile(r'\{(\s*\w+\s*(=~|!~|!=|=)\s*"[^"]*"\s*,?)*\}')


def well_formed(expr: str) -> bool:
    """What can be checked of PromQL without Prometheus: brackets balance and every label selector
    is a list of `label op "value"` matchers."""
    depth = {"(": 0, "[": 0}
    for char in SELECTOR.sub("", expr):
        if char in "{}":
            return False  # a selector that did not match the matcher grammar
        if char in "([":
            depth[char] += 1
        elif char in ")]":
            depth["(" if char == ")" else "["] -= 1
            if min(depth.values()) < 0:
                return False
    return not any(depth.values())


def test_dashboard_queries_are_well_formed_and_name_only_series_the_operator_exports() -> None:
    (config_map,) = [o for o in manifests({}) if o["kind"] == "ConfigMap"]
    dashboard = json.loads(config_map["data"]["celery-worker-operator.json"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert not well_formed('sum(rate(x{a="b"}[5m])') and not well_formed("x{a=b}"), "the check can fail"
    assert [expr for expr in exprs if not well_formed(expr)] == []
    queried = {name for expr in exprs for name in SERIES.findall(expr)}
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    assert all(word in titles for word in ("queue depth", "wait", "replicas vs desired", "decisions", "runtime"))
    assert {"celery_task_runtime_bucket", "celery_queue_length", "celery_worker_up"} <= queried
    assert queried <= exported_names(), queried - exported_names()


@combinations
def test_alert_rules_only_when_enabled_each_on_an_exported_series(values: dict[str, Any]) -> None:
    rules = of_kind(manifests(values), "PrometheusRule")
    wanted = values.get("metrics", {}).get("prometheusRule", {})
    if not wanted.get("enabled"):
        assert rules == []
        return
    (rule,) = rules
    assert rule["metadata"]["labels"]["release"] == wanted["labels"]["release"]
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {
        "CeleryWorkerPoolWaitOverTarget", "CeleryWorkerPoolAtMaxReplicas", "CeleryWorkerPoolMetricsUnavailable",
        "CeleryWorkerPoolLimitsNotApplied", "CeleryWorkerPoolBlocked", "CeleryWorkerPoolCrashLooping",
    }  # fmt: skip
    assert alerts["CeleryWorkerPoolWaitOverTarget"]["for"] == wanted["waitOverTargetFor"]
    for name, alert in alerts.items():
        assert well_formed(alert["expr"]), name
        assert set(SERIES.findall(alert["expr"])) <= exported_names(), name
        assert "{{ $labels.namespace }}/{{ $labels.pool }}" in alert["annotations"]["summary"], name
        assert name in README, f"{name} has no runbook line in the README"


README = (ROOT / "README.md").read_text()


def exported_names() -> set[str]:
    """Every series name the exporter produces once each kind of record has been made."""
    metrics = PoolMetrics()
    status = {
        "replicas": 1, "readyReplicas": 1, "desiredReplicas": 2, "depth": 3, "waitSeconds": 4.0,
        "arrivalRate": 1.0, "serviceTimeSeconds": 0.5, "workersOnline": 1,
        "queues": [{"name": "q", "depth": 3, "reserved": 0, "consumers": 1, "oldestAgeSeconds": 4.0}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }  # fmt: skip
    events = EventAggregator()
    task = {"hostname": "p@pod-1", "uuid": "t", "timestamp": 1.0, "name": "app.task"}
    for kind in ("task-received", "task-started", "task-succeeded"):
        events.feed({**task, "type": kind, "runtime": 0.1}, 1.0)
    metrics.record_pass(
        "ns",
        "p",
        status,
        Decision(2, DecisionKind.STEADY, Limit.WITHIN_RANGE, "scale up", 2, Terms(1, 2, 2, slots=2.0)),
        busy_slots=1,
        telemetry=events.snapshot("p", 1.0),
        autoscaling=AutoscalingSpec(),
    )
    metrics.record_broadcast_error("ns", "p", 1)
    metrics.record_probe("redis://h", 0.01, error=True)
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
