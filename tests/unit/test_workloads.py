"""The worker Deployment and command line, built by pure functions and compared as dicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_worker_operator.manifests import load_pools
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.command import concurrency_from_args, grace_seconds, worker_args
from celery_worker_operator.workloads.kubernetes import build_deployment, merge_template

ROOT = Path(__file__).resolve().parents[2]


def managed_pool() -> CeleryWorkerPool:
    return load_pools(ROOT / "examples" / "redis-managed-pool.yaml")[0]


def test_worker_command_carries_every_setting() -> None:
    pool = managed_pool()
    assert pool.spec.worker is not None
    args = worker_args("emails", "emails-7d9f-abcde", pool.spec, pool.spec.worker)
    assert args == [
        "-A", "shop.celery:app", "worker", "-Q", "emails,emails-bulk", "-c", "8", "-P", "prefork",
        "-n", "emails@emails-7d9f-abcde", "--prefetch-multiplier=1", "--max-tasks-per-child=1000",
        "--max-memory-per-child=200000", "-E", "task_acks_late=true", "worker_soft_shutdown_timeout=30",
    ]  # fmt: skip


def test_deployment_for_a_managed_pool() -> None:
    deployment = build_deployment(managed_pool(), uid="uid-1", replicas=2)
    assert deployment["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "name": "emails",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"] == {"matchLabels": {"celery-operator.dev/pool": "emails"}}
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45  # soft shutdown 30 s + 15 s margin
    (container,) = pod["containers"]
    assert container["command"] == ["celery"]
    assert "emails@$(POD_NAME)" in container["args"]
    assert container["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}}  # from spec.worker.template


def test_broker_url_comes_from_the_secret() -> None:
    pool = managed_pool()
    document = pool.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["broker"] = {"urlFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}
    pool = type(pool).model_validate(document)
    env = build_deployment(pool, "u", 1)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[1] == {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}


def test_grace_period_covers_the_longest_hard_limit() -> None:
    pool = load_pools(ROOT / "examples" / "pool-with-limits.yaml")[0]
    assert grace_seconds(pool.spec) == 3600 + 15


def test_adopted_pools_have_no_managed_deployment() -> None:
    pool = load_pools(ROOT / "examples" / "rabbitmq-adopted-pool.yaml")[0]
    with pytest.raises(ValueError, match="adopts"):
        build_deployment(pool, "u", 1)


def test_template_overrides_merge_containers_by_name() -> None:
    base = {"spec": {"containers": [{"name": "worker", "image": "a", "env": [{"name": "X", "value": "1"}]}]}}
    override = {
        "metadata": {"annotations": {"a": "b"}},
        "spec": {"containers": [{"name": "worker", "env": [{"name": "Y", "value": "2"}]}, {"name": "sidecar"}]},
    }
    merged = merge_template(base, override)
    assert merged["metadata"] == {"annotations": {"a": "b"}}
    worker, sidecar = merged["spec"]["containers"]
    assert worker["image"] == "a"
    assert worker["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert sidecar == {"name": "sidecar"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["celery", "-A", "p", "worker", "-c", "6"], 6),
        (["celery", "worker", "--concurrency=12"], 12),
        (["celery", "worker", "--concurrency", "3"], 3),
        (["celery", "worker"], None),
        (["celery", "worker", "-c"], None),
    ],
)
def test_concurrency_of_an_adopted_worker_command(args: list[str], expected: int | None) -> None:
    assert concurrency_from_args(args) == expected
