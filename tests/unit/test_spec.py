"""The CeleryWorkerPool API: the models, the generated CRD and the examples agree with each other.

What kube-apiserver itself does with the CRD (defaults, schema, CEL rules) is tested on a real one in
tests/operator/test_crd.py, with the examples and the broken specs of this file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_worker_operator import spec
from celery_worker_operator.crd import build_crd
from celery_worker_operator.manifests import InvalidPool, load_pools, parse_pool

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "crds" / "celeryworkerpools.celery-operator.dev.yaml"
DEMO_POOL = ROOT / "operator" / "celery_worker_operator" / "demo" / "pool.yaml"
EXAMPLES = [*sorted((ROOT / "examples").glob("*.yaml")), DEMO_POOL]


def pools_in(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == spec.KIND]


def test_committed_crd_is_the_generated_one() -> None:
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert committed == build_crd(), "deploy/crds is stale: run `make crd`"


def test_crd_is_structural_and_has_the_subresources() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    text = yaml.safe_dump(version["schema"])
    for forbidden in ("$ref", "anyOf", "$defs", "title:", "null", "const:"):
        assert forbidden not in text
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Queues", "Depth", "Wait", "Replicas", "Desired", "Mode", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["cwp"]
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in version["additionalPrinterColumns"]:
        top, field = column["jsonPath"].split(".")[1:3]
        if top == "status":
            assert field in status_props, f"printer column {column['name']} points at a missing status field"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_pools(path: Path) -> None:
    documents = pools_in(path)
    assert documents
    for document in documents:
        assert parse_pool(document).metadata.name == document["metadata"]["name"]


def test_load_pools_skips_other_kinds() -> None:
    pools = load_pools(ROOT / "examples" / "rabbitmq-adopted-pool.yaml")
    assert [p.metadata.name for p in pools] == ["reports"]
    assert pools[0].spec.broker.url_from is not None
    assert pools[0].spec.broker.url_from.secret_key_ref.key == "url"


BASE: dict[str, Any] = {
    "apiVersion": spec.API_VERSION,
    "kind": spec.KIND,
    "metadata": {"name": "emails"},
    "spec": {
        "broker": {"url": "redis://redis:6379/0"},
        "queues": ["emails"],
        "worker": {"app": "shop.celery:app", "image": "shop:1"},
        "limits": {"rateLimits": {"shop.tasks.send": "10/s"}, "timeLimits": {"shop.tasks.send": {"soft": 5}}},
    },
}


def mutate(path: str, value: Any, **more: Any) -> dict[str, Any]:
    """BASE with fields set (or removed when the value is DELETE); paths are dotted from the root.

    Further changes go in `more`, with `__` standing for the dots of their paths.
    """
    document = copy.deepcopy(BASE)
    for dotted, new in [(path, value), *((k.replace("__", "."), v) for k, v in more.items())]:
        *parents, last = dotted.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        if new is DELETE:
            del node[last]
        else:
            node[last] = new
    return document


DELETE = object()
SECRET_REF = {"secretKeyRef": {"name": "broker", "key": "password"}}

# A map entry: pydantic writes `timeLimits.shop.tasks.send.soft`, the API server `timeLimits[shop.tasks.send].soft`.
SOFT_LIMIT = r"timeLimits[.\[]shop\.tasks\.send\]?\.soft"
HARD_LIMIT = r"timeLimits[.\[]shop\.tasks\.send\]?\.hard"

# (what is wrong, the document, the field the error must name: a regex, where a dot matches itself too)
BROKEN = [
    ("password in url", mutate("spec.broker.url", "redis://:s3cret@redis:6379/0"), "broker.url"),
    ("user and password in url", mutate("spec.broker.url", "amqp://app:s3cret@rabbit:5672//"), "broker.url"),
    ("password query parameter", mutate("spec.broker.url", "redis://redis:6379/0?password=s3cret"), "broker.url"),
    ("url and urlFrom", mutate("spec.broker.urlFrom", {"secretKeyRef": {"name": "b", "key": "url"}}), "broker.url"),
    ("neither url nor urlFrom", mutate("spec.broker.url", DELETE), "broker.url"),
    (
        "passwordFrom with urlFrom",
        mutate("spec.broker", {"urlFrom": {"secretKeyRef": {"name": "b", "key": "url"}}, "passwordFrom": SECRET_REF}),
        "broker.url",
    ),
    ("unsupported scheme", mutate("spec.broker.url", "http://redis:6379"), "broker.url"),
    ("sentinel without master_name", mutate("spec.broker.url", "sentinel://s1:26379;sentinel://s2:26379"), "broker"),
    ("tls on a plain redis:// url", mutate("spec.broker.tls", {"caFrom": SECRET_REF}), "broker.tls"),
    (
        "tls with ssl_* parameters in url",
        mutate("spec.broker.url", "rediss://redis:6380/0?ssl_cert_reqs=none", spec__broker__tls={"caFrom": SECRET_REF}),
        "broker.url",
    ),
    (
        "tls certFrom without keyFrom",
        mutate("spec.broker.url", "rediss://redis:6380/0", spec__broker__tls={"certFrom": SECRET_REF}),
        "broker.tls.keyFrom",
    ),
    ("tls with no file", mutate("spec.broker.url", "rediss://redis:6380/0", spec__broker__tls={}), "broker.tls.caFrom"),
    (
        "secret name not DNS-1123",
        mutate("spec.broker", {"urlFrom": {"secretKeyRef": {"name": "Bad_Nm", "key": "u"}}}),
        "secretKeyRef.name",
    ),
    ("no queues", mutate("spec.queues", []), "spec.queues"),
    ("repeated queue", mutate("spec.queues", ["emails", "emails"]), "spec.queues"),
    ("queue name with a space", mutate("spec.queues", ["bad queue"]), "spec.queues"),
    ("worker and scaleTargetRef", mutate("spec.scaleTargetRef", {"name": "shop-worker"}), "spec.worker"),
    ("neither worker nor scaleTargetRef", mutate("spec.worker", DELETE), "spec.worker"),
    (
        "scaleTargetRef name not DNS-1123",
        mutate("spec.worker", DELETE, spec__scaleTargetRef={"name": "Shop"}),
        "scaleTargetRef.name",
    ),
    ("zero concurrency", mutate("spec.worker.concurrency", 0), "worker.concurrency"),
    ("unknown pool", mutate("spec.worker.pool", "fork"), "pool"),
    (
        "solo pool with concurrency 4",
        mutate("spec.worker.pool", "solo", spec__worker__concurrency=4),
        "concurrency",
    ),
    ("queues flag in extraArgs", mutate("spec.worker.extraArgs", ["-Q", "other"]), "worker.extraArgs"),
    ("concurrency flag in extraArgs", mutate("spec.worker.extraArgs", ["--concurrency=9"]), "worker.extraArgs"),
    (
        "disablePrefetch on AMQP",
        mutate("spec.broker.url", "amqp://rabbit//", spec__worker__disablePrefetch=True),
        "worker.disablePrefetch",
    ),
    ("min above max", mutate("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}), "autoscaling.maxReplicas"),
    ("negative minReplicas", mutate("spec.autoscaling", {"minReplicas": -1}), "autoscaling.minReplicas"),
    ("utilization above 1", mutate("spec.autoscaling", {"targetUtilization": 1.5}), "targetUtilization"),
    ("zero target wait", mutate("spec.autoscaling", {"targetWaitSeconds": 0}), "targetWaitSeconds"),
    ("fallback above max", mutate("spec.autoscaling", {"maxReplicas": 3, "fallbackReplicas": 4}), "fallbackReplicas"),
    ("unknown scale-down mode", mutate("spec.autoscaling", {"scaleDown": {"mode": "random"}}), "scaleDown.mode"),
    ("zero step percent", mutate("spec.autoscaling", {"scaleUp": {"maxStepPercent": 0}}), "maxStepPercent"),
    (
        "maxConcurrentTasks below concurrency",
        mutate("spec.autoscaling", {"maxConcurrentTasks": 3}, spec__worker__concurrency=4),
        "autoscaling.maxConcurrentTasks",
    ),
    ("zero maxConcurrentTasks", mutate("spec.autoscaling", {"maxConcurrentTasks": 0}), "maxConcurrentTasks"),
    (
        "pool rate keyed by a non-task",
        mutate("spec.limits.poolRateLimits", {"not a task": "1/s"}),
        "limits.poolRateLimits",
    ),
    (
        "task with both a worker and a pool rate",
        mutate("spec.limits.poolRateLimits", {"shop.tasks.send": "60/m"}),
        "limits.poolRateLimits",
    ),
    ("pool rate with a word unit", mutate("spec.limits.poolRateLimits", {"a.b": "1/day"}), "limits.poolRateLimits"),
    ("rate with a word unit", mutate("spec.limits.rateLimits", {"shop.tasks.send": "200/min"}), "limits.rateLimits"),
    ("rate keyed by a non-task", mutate("spec.limits.rateLimits", {"not a task": "1/s"}), "limits.rateLimits"),
    (
        "soft not below hard",
        mutate("spec.limits.timeLimits", {"shop.tasks.send": {"soft": 30, "hard": 30}}),
        SOFT_LIMIT,
    ),
    (
        "time limit with neither",
        mutate("spec.limits.timeLimits", {"shop.tasks.send": {}}),
        SOFT_LIMIT,
    ),
    (
        "negative hard limit",
        mutate("spec.limits.timeLimits", {"shop.tasks.send": {"hard": -1}}),
        HARD_LIMIT,
    ),
    ("unknown spec field", mutate("spec.autoscale", {"maxReplicas": 3}), "autoscale"),
    ("unknown worker field", mutate("spec.worker.concurency", 3), "concurency"),
    ("pool name not a DNS label", mutate("metadata.name", "Emails_Pool"), "metadata.name"),
]


@pytest.mark.parametrize(("what", "document", "field"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_spec_is_refused_by_the_models_naming_the_field(what: str, document: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPool) as refused:
        parse_pool(document)
    assert re.search(field, str(refused.value)), f"{what}: {refused.value}"


def test_refusal_never_prints_the_password() -> None:
    with pytest.raises(InvalidPool) as refused:
        parse_pool(mutate("spec.broker.url", "amqp://app:s3cret@rabbit:5672//"))
    assert "s3cret" not in str(refused.value)
    assert "urlFrom.secretKeyRef" in str(refused.value)


def test_there_are_twenty_or_more_broken_specs() -> None:
    assert len(BROKEN) >= 20


def test_defaults_follow_the_operations_guide() -> None:
    worker = spec.WorkerSpec(app="a", image="i")
    assert (worker.prefetch_multiplier, worker.acks_late, worker.events) == (1, True, True)
    scaling = spec.AutoscalingSpec()
    assert scaling.scale_down.stabilization_seconds < 300, "workers start in seconds: no HPA-length window"
