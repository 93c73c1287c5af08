"""The worker Deployment and command line, built by pure functions and compared as dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from celery_worker_operator.manifests import load_pools
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.command import concurrency_from_args, grace_seconds, worker_args
from celery_worker_operator.workloads.kubernetes import (
    applying_managers,
    build_deployment,
    conflicting_managers,
    crash_loop,
    merge_template,
    replicas_declared_by,
)
from celery_worker_operator.workloads.local import CrashBackoff, WorkerExit

ROOT = Path(__file__).resolve().parents[2]


def managed_pool() -> CeleryWorkerPool:
    return load_pools(ROOT / "examples" / "redis-managed-pool.yaml")[0]


def test_worker_command_carries_every_setting() -> None:
    pool = managed_pool()
    assert pool.spec.worker is not None
    args = worker_args(pool.identity, "emails-7d9f-abcde", pool.spec, pool.spec.worker)
    assert args == [
        "-A", "shop.celery:app", "worker", "-Q", "emails,emails-bulk", "-c", "8", "-P", "prefork",
        "-n", "emails.default@emails-7d9f-abcde", "--prefetch-multiplier=1", "--max-tasks-per-child=1000",
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
    assert "emails.default@$(POD_NAME)" in container["args"], "workers are named after pool, namespace and pod"
    assert container["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "512Mi"}}  # from spec.worker.template
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError", "Celery's reason reaches the pod"


def test_broker_url_comes_from_the_secret() -> None:
    pool = managed_pool()
    document = pool.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["broker"] = {"urlFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}
    pool = type(pool).model_validate(document)
    env = build_deployment(pool, "u", 1)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[1] == {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "url"}}}


def test_credentials_from_secret_keys_are_put_together_in_the_pod() -> None:
    pool = managed_pool()
    document = pool.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["broker"] = {
        "url": "redis://redis:6379/0",
        "usernameFrom": {"secretKeyRef": {"name": "redis-login", "key": "user"}},
        "passwordFrom": {"secretKeyRef": {"name": "redis-login", "key": "password"}},
    }
    pool = type(pool).model_validate(document)
    env = build_deployment(pool, "u", 1)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[1:] == [  # each variable a URL reads is defined before it, as `$(VAR)` expansion needs
        {"name": "CELERY_BROKER_USERNAME", "valueFrom": {"secretKeyRef": {"name": "redis-login", "key": "user"}}},
        {"name": "CELERY_BROKER_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-login", "key": "password"}}},
        {
            "name": "CELERY_BROKER_URL",
            "value": "redis://$(CELERY_BROKER_USERNAME):$(CELERY_BROKER_PASSWORD)@redis:6379/0",
        },
    ]


def test_tls_files_are_mounted_read_only_and_given_to_celery() -> None:
    """CA and client certificate from one Secret, the key from another: one volume, a source per Secret,
    and Celery's broker_use_ssl pointing at the files (kombu reads it for url and urlFrom alike)."""
    pool = managed_pool()
    document = pool.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["broker"] = {
        "urlFrom": {"secretKeyRef": {"name": "broker", "key": "url"}},
        "tls": {
            "caFrom": {"secretKeyRef": {"name": "redis-tls", "key": "ca.crt"}},
            "certFrom": {"secretKeyRef": {"name": "redis-tls", "key": "tls.crt"}},
            "keyFrom": {"secretKeyRef": {"name": "redis-client-key", "key": "key"}},
        },
    }
    pod = build_deployment(type(pool).model_validate(document), "u", 1)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["volumes"] == [
        {
            "name": "celery-broker-tls",
            "projected": {
                "sources": [
                    {
                        "secret": {
                            "name": "redis-tls",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}, {"key": "tls.crt", "path": "tls.crt"}],
                        }
                    },
                    {"secret": {"name": "redis-client-key", "items": [{"key": "key", "path": "tls.key"}]}},
                ]
            },
        }
    ]
    assert container["volumeMounts"] == [
        {"name": "celery-broker-tls", "mountPath": "/etc/celery-broker-tls", "readOnly": True}
    ]
    assert container["args"][-1] == (
        'broker_use_ssl=(json){"ssl_cert_reqs":"required","ssl_ca_certs":"/etc/celery-broker-tls/ca.crt",'
        '"ssl_certfile":"/etc/celery-broker-tls/tls.crt","ssl_keyfile":"/etc/celery-broker-tls/tls.key"}'
    )


def test_a_pool_without_tls_mounts_nothing() -> None:
    pod = build_deployment(managed_pool(), "u", 1)["spec"]["template"]["spec"]
    assert "volumes" not in pod and "volumeMounts" not in pod["containers"][0]
    assert not any(arg.startswith("broker_use_ssl") for arg in pod["containers"][0]["args"])


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


def test_restarts_back_off_like_the_kubelet_doubling_from_10_s_to_5_min() -> None:
    backoff = CrashBackoff()
    delays = [backoff.exited(now=0.0, ran_seconds=1.0) for _ in range(7)]
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    assert backoff.looping() and not backoff.may_start(299.0)
    assert backoff.exited(now=0.0, ran_seconds=600.0) == 10, "a worker that ran 10 min resets the back-off"


def test_a_worker_running_10_minutes_forgives_earlier_exits() -> None:
    backoff = CrashBackoff()
    backoff.exited(0.0, 1.0), backoff.exited(10.0, 1.0)
    backoff.ran(599.0)
    assert backoff.looping()
    backoff.ran(600.0)
    assert not backoff.looping()


def test_a_worker_exit_quotes_its_last_lines() -> None:
    tail = (
        "Error: Invalid value for '-A' / '--app':",
        "Unable to load celery application.",
        "The module typo was not found.",
    )
    message = WorkerExit("typo-1", 2, tail, exits=1, restart_in=10.0).message()
    assert message.startswith("worker typo-1 exited with 2 (1 in a row; next start in 10 s): Error:")
    assert "Unable to load celery application. | The module typo was not found." in message


def test_a_pod_in_crash_loop_back_off_is_reported_with_its_termination_message() -> None:
    terminated = client.V1ContainerStateTerminated(
        exit_code=2, message="Usage: celery [OPTIONS]\n\nUnable to load celery application.\n"
    )
    crashing = client.V1ContainerStatus(
        name="worker", image="i", image_id="", ready=False, restart_count=3,
        state=client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason="CrashLoopBackOff")),
        last_state=client.V1ContainerState(terminated=terminated),
    )  # fmt: skip
    running = client.V1ContainerStatus(
        name="worker", image="i", image_id="", ready=True, restart_count=0,
        state=client.V1ContainerState(running=client.V1ContainerStateRunning()),
    )  # fmt: skip

    def pod(name: str, status: client.V1ContainerStatus) -> client.V1Pod:
        return client.V1Pod(
            metadata=client.V1ObjectMeta(name=name), status=client.V1PodStatus(container_statuses=[status])
        )

    assert crash_loop([pod("ok", running), client.V1Pod(metadata=client.V1ObjectMeta(name="new"))]) is None
    assert crash_loop([pod("ok", running), pod("bad", crashing)]) == (
        "pod bad exited with 2 (3 restarts): Usage: celery [OPTIONS] | Unable to load celery application."
    )


def managed(manager: str, operation: str, fields: dict[str, object], subresource: str = "") -> dict[str, object]:
    return {"manager": manager, "operation": operation, "fieldsV1": fields, "subresource": subresource}


REPLICAS = {"f:spec": {"f:replicas": {}}}
TEMPLATE = {"f:spec": {"f:template": {"f:spec": {}}}}


@pytest.mark.parametrize(
    ("entries", "declared"),
    [
        ([], ()),
        ([managed("celery-worker-operator", "Apply", REPLICAS, "scale")], ()),  # our own
        ([managed("argocd-controller", "Apply", TEMPLATE)], ()),  # applies the rest, not replicas
        ([managed("argocd-controller", "Apply", REPLICAS)], ("argocd-controller",)),
        ([managed("kubectl", "Update", REPLICAS, "scale")], ()),  # a one-off `kubectl scale`: ours to take
        ([managed("kubectl-client-side-apply", "Update", REPLICAS)], ()),
        ([managed("helm", "Apply", REPLICAS), managed("flux", "Apply", REPLICAS)], ("flux", "helm")),
    ],
)
def test_who_else_applies_the_replica_count(entries: list[dict[str, object]], declared: tuple[str, ...]) -> None:
    assert replicas_declared_by(entries) == declared


def test_a_409_names_the_managers_and_fields_and_only_appliers_stop_the_operator() -> None:
    answer = {
        "kind": "Status",
        "code": 409,
        "details": {
            "causes": [
                {"reason": "FieldManagerConflict", "message": 'conflict with "argocd-controller"', "field": ".spec.x"},
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "kubectl-edit" with subresource "scale" using autoscaling/v1',
                    "field": ".spec.replicas",
                },
            ]
        },
    }
    assert conflicting_managers(answer) == {"argocd-controller": [".spec.x"], "kubectl-edit": [".spec.replicas"]}
    entries = [managed("argocd-controller", "Apply", TEMPLATE), managed("kubectl-edit", "Update", REPLICAS)]
    assert applying_managers(entries) & set(conflicting_managers(answer)) == {"argocd-controller"}
