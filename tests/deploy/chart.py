"""Render the Helm chart offline with Helm's own Go SDK (helm-python-sdk), as `helm template` would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "celery-worker-operator"
RELEASE, NAMESPACE = "cwo", "ops"

# Value combinations every chart test runs on: each mode the chart promises.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watch": {"clusterWide": False, "namespaces": ["team-a", "team-b"]}},
    "release-namespace-only": {"watch": {"clusterWide": False}},
    "peering-cluster-wide": {"peering": {"enabled": True}, "replicaCount": 2},
    "peering-namespaced": {"peering": {"enabled": True}, "replicaCount": 3, "watch": {"clusterWide": False}},
    "monitoring": {
        "metrics": {
            "port": 9300,
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prom"}, "waitOverTargetFor": "3m"},
        },
        "health": {"port": 8181},
        "dashboard": {"enabled": False},
        "fullnameOverride": "celery-ops",
        "serviceAccount": {"name": "celery-ops-sa", "annotations": {"team": "platform"}},
        "image": {"repository": "registry.example/cwo", "tag": "1.2.3", "pullPolicy": "Always"},
    },
    "no-rbac": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "existing"}},
    "customized": {
        "logLevel": "DEBUG",
        "logFormat": "json",
        "podSecurityContext": {"fsGroup": 10001},
        "securityContext": {"readOnlyRootFilesystem": True},
        "extraVolumes": [{"name": "broker-ca", "secret": {"secretName": "broker-ca"}}],
        "extraVolumeMounts": [{"name": "broker-ca", "mountPath": "/etc/broker-ca", "readOnly": True}],
        "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/broker-ca/ca.crt"}],
        "readinessProbe": {"enabled": False},
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "prom"},
                "relabelings": [
                    {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}
                ],
                "metricRelabelings": [
                    {"action": "drop", "sourceLabels": ["__name__"], "regex": "celery_task_queue_wait_seconds_.*"}
                ],
            }
        },
        "tests": {"healthzUrl": "http://127.0.0.1:8080/healthz"},
    },
}


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, for an install of release `cwo` in `namespace` (default `ops`)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=namespace, is_install=True)


def manifests(values: dict[str, Any], namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every object the release would create (templates only: crds/ is Helm's separate step)."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render(values, namespace).items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def chart_crds() -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        return [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
