"""The operator as users run it: kopf with our handlers against the kmock API, real Redis, real workers."""

from __future__ import annotations

import asyncio
import base64
import copy
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kubernetes import client

from celery_worker_operator.handlers import registry
from celery_worker_operator.kube import Operator
from celery_worker_operator.workloads.kubernetes import DELETION_COST, POOL_LABEL
from tests.support.celery_app import HOLD, make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.k8s import (
    Emulator,
    api_client_for,
    apply_pool,
    events_for,
    read_pool,
    running_operator,
    wait_for,
)
from tests.support.redis_server import PrivateRedis

pytest_plugins = ["tests.support.k8s"]
pytestmark = pytest.mark.timeout(120)

NS = "default"


def pool_manifest(name: str, queue: str, **autoscaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "broker": {"urlFrom": {"secretKeyRef": {"name": f"{name}-broker", "key": "url"}}},
            "queues": [queue],
            "worker": {"app": "tests.support.celery_app:app", "image": "registry.example/app:1", "concurrency": 2},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 6, "pollSeconds": 1, "targetWaitSeconds": 5,
                            "taskDurationSeconds": 1, **autoscaling},
        },
    }  # fmt: skip


def create_secret(api: client.ApiClient, name: str, url: str) -> None:
    body = {"metadata": {"name": name, "namespace": NS}, "data": {"url": base64.b64encode(url.encode()).decode()}}
    client.CoreV1Api(api).create_namespaced_secret(NS, body)


def deployment(api: client.ApiClient, name: str) -> Any:
    return client.AppsV1Api(api).read_namespaced_deployment(name, NS)


def condition(pool: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in pool.get("status", {}).get("conditions", []) if c["type"] == type_), None)


@asynccontextmanager
async def operator(emulator: Emulator) -> AsyncIterator[Operator]:
    state = Operator(api_client_for(emulator))
    async with running_operator(emulator, registry, memo=state, timeout=20):
        yield state


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    yield f"pool-{suffix}", f"q-{suffix}"


async def test_managed_pool_gets_its_deployment_and_status(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    create_secret(k8s_api, f"{name}-broker", redis_url)
    async with operator(k8s_emulator):
        apply_pool(k8s_api, pool_manifest(name, queue))
        made = await wait_for(lambda: _exists(k8s_api, name), timeout=15)
        assert made
        dep = deployment(k8s_api, name)
        owner = dep.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("CeleryWorkerPool", name, True)
        container = dep.spec.template.spec.containers[0]
        assert container.command == ["celery"]
        assert ["-Q", queue, "-c", "2"] == container.args[3:7]
        assert f"{name}@$(POD_NAME)" in container.args
        broker_env = next(e for e in container.env if e.name == "CELERY_BROKER_URL")
        assert broker_env.value_from.secret_key_ref.name == f"{name}-broker"
        assert dep.spec.template.spec.termination_grace_period_seconds == 30
        status = await wait_for(lambda: read_pool(k8s_api, name).get("status", {}).get("queues"), timeout=15)
        assert status[0]["name"] == queue
        assert condition(read_pool(k8s_api, name), "MetricsAvailable")["status"] == "True"  # type: ignore[index]

        changed = copy.deepcopy(pool_manifest(name, queue))
        changed["spec"]["worker"]["concurrency"] = 5
        apply_pool(k8s_api, changed)
        await wait_for(lambda: "5" in deployment(k8s_api, name).spec.template.spec.containers[0].args, timeout=15)


def _exists(api: client.ApiClient, name: str) -> bool:
    try:
        deployment(api, name)
    except client.ApiException:
        return False
    return True


def events_named(api: client.ApiClient, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events_for(api, name) if e["reason"] == reason]


def create_pod(api: client.ApiClient, pool: str, pod: str) -> None:
    """What the ReplicaSet would do (kmock runs no controllers): a Pod with the pool's labels."""
    body = {
        "metadata": {"name": pod, "namespace": NS, "labels": {POOL_LABEL: pool}},
        "spec": {"containers": [{"name": "worker", "image": "registry.example/app:1"}]},
    }
    client.CoreV1Api(api).create_namespaced_pod(NS, body)


def start_pod_workers(
    api: client.ApiClient, workers: CeleryWorkers, sender: Celery, pool: str, queue: str, concurrency: int
) -> list[str]:
    """Two Pods as the ReplicaSet would make them, each with a real worker named after it."""
    pods = [f"{pool}-a", f"{pool}-b"]
    for pod in pods:
        create_pod(api, pool, pod)
        workers.start(f"{pool}@{pod}", [queue], concurrency=concurrency, prefetch_multiplier=1)
    for pod in pods:
        workers.wait_ready(sender, f"{pool}@{pod}")
    return pods


def task_holder(sender: Celery, pool: str, pods: list[str], task_id: str) -> str | None:
    """The worker (hostname) running `task_id` now, if any."""
    active = sender.control.inspect(destination=[f"{pool}@{p}" for p in pods], timeout=1).active() or {}
    return next((h for h, tasks in active.items() if any(t["id"] == task_id for t in tasks)), None)


def deletion_cost(api: client.ApiClient, pod: str) -> str | None:
    annotations = client.CoreV1Api(api).read_namespaced_pod(pod, NS).metadata.annotations or {}
    return annotations.get(DELETION_COST)


async def test_burst_scales_up_with_its_terms_and_down_sparing_the_busy_pod(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    create_secret(k8s_api, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    with CeleryWorkers("tests.support.celery_app", redis_url) as workers:
        pods = start_pod_workers(k8s_api, workers, sender, name, queue, concurrency=2)
        async with operator(k8s_emulator):
            apply_pool(k8s_api, pool_manifest(name, queue, maxReplicas=4, scaleDown={"stabilizationSeconds": 2}))
            await wait_for(lambda: _exists(k8s_api, name), timeout=15)
            for _ in range(40):  # 40 x 1 s / 5 s target = 8 slots = 4 replicas from the backlog alone
                sender.send_task(HOLD, (1.0,), queue=queue)
            await wait_for(lambda: deployment(k8s_api, name).spec.replicas == 4, timeout=20)
            up = await wait_for(lambda: events_named(k8s_api, name, "ScaledUp"), timeout=10)  # posted by kopf, async
            assert "waiting" in up[0]["message"] and "slots" in up[0]["message"], up

            busy = sender.send_task(HOLD, (40.0,), queue=queue)

            def holder() -> str | None:
                return task_holder(sender, name, pods, busy.id)

            worker = await wait_for(holder, timeout=30)
            busy_pod = worker.partition("@")[2]
            idle_pod = next(p for p in pods if p != busy_pod)
            # Once the burst is done, the next scale-down marks the idle pod as the cheaper one to remove.
            await wait_for(lambda: deployment(k8s_api, name).spec.replicas == 1, timeout=60)
            assert deletion_cost(k8s_api, idle_pod) == "0"
            assert int(deletion_cost(k8s_api, busy_pod) or 0) >= 1
            assert await wait_for(lambda: events_named(k8s_api, name, "ScaledDown"), timeout=10)
            busy.revoke(terminate=True)
    redis.Redis.from_url(redis_url).delete(queue)


def adopted_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "metadata": {"name": name, "namespace": NS, "labels": labels, "annotations": {"owner": "team-chart"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "w", "image": "team/app:3", "args": ["celery", "worker", "-c", "3"]}]},
            },
        },
    }


async def test_adopted_deployment_only_changes_replicas(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    apps = client.AppsV1Api(k8s_api)
    apps.create_namespaced_deployment(NS, adopted_deployment(f"{name}-app"))
    before = apps.read_namespaced_deployment(f"{name}-app", NS).to_dict()
    manifest = pool_manifest(name, queue, minReplicas=3, maxReplicas=5)
    del manifest["spec"]["worker"]
    manifest["spec"]["scaleTargetRef"] = {"name": f"{name}-app"}
    manifest["spec"]["broker"] = {"url": redis_url}
    async with operator(k8s_emulator):
        apply_pool(k8s_api, manifest)
        await wait_for(lambda: apps.read_namespaced_deployment(f"{name}-app", NS).spec.replicas == 3, timeout=15)
    after = apps.read_namespaced_deployment(f"{name}-app", NS).to_dict()
    for volatile in ("resource_version", "generation", "managed_fields"):
        before["metadata"].pop(volatile), after["metadata"].pop(volatile)
    before["spec"].pop("replicas"), after["spec"].pop("replicas")
    assert after == before, "the operator touched more than the replica count of an adopted Deployment"
    assert not _exists(k8s_api, name), "an adopted pool must not get a managed Deployment"


async def test_missing_secret_is_a_condition_and_an_event_and_other_pools_go_on(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    create_secret(k8s_api, f"{name}-ok-broker", redis_url)
    async with operator(k8s_emulator):
        apply_pool(k8s_api, pool_manifest(name, queue))  # its Secret was never made
        apply_pool(k8s_api, pool_manifest(f"{name}-ok", queue))
        blocked = await wait_for(lambda: condition(read_pool(k8s_api, name), "Ready"), timeout=15)
        assert (blocked["status"], blocked["reason"]) == ("False", "SecretMissing")
        assert f"{name}-broker" in blocked["message"]
        await wait_for(lambda: events_named(k8s_api, name, "SecretMissing"), timeout=10)
        fine = await wait_for(lambda: condition(read_pool(k8s_api, f"{name}-ok"), "MetricsAvailable"), timeout=15)
        assert fine["status"] == "True"
        create_secret(k8s_api, f"{name}-broker", redis_url)
        await wait_for(lambda: (condition(read_pool(k8s_api, name), "Ready") or {}).get("status") == "True", timeout=15)
        warnings = events_named(k8s_api, name, "SecretMissing")
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning", "one Warning when blocked, not one per poll"


async def test_broker_outage_holds_replicas_and_recovers(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, tmp_path: Path, names: tuple[str, str]
) -> None:
    name, queue = names
    with PrivateRedis(tmp_path, password="outage-s3cret") as private:
        create_secret(k8s_api, f"{name}-broker", private.url)
        async with operator(k8s_emulator):
            apply_pool(k8s_api, pool_manifest(name, queue, minReplicas=2))
            await wait_for(lambda: metrics_status(k8s_api, name) == "True", timeout=15)
            private.stop()
            down = await wait_for(lambda: condition(read_pool(k8s_api, name), "MetricsAvailable"), timeout=20,
                                  ok=lambda c: c["status"] == "False")  # fmt: skip
            assert down["reason"] == "BrokerUnavailable"
            assert "outage-s3cret" not in str(read_pool(k8s_api, name)), "a password reached the status"
            assert deployment(k8s_api, name).spec.replicas == 2, "blind, the pool must hold its replicas"
            private.start()
            await wait_for(lambda: metrics_status(k8s_api, name) == "True", timeout=30)
    assert all("outage-s3cret" not in e["message"] for e in events_for(k8s_api, name))


def metrics_status(api: client.ApiClient, name: str) -> str | None:
    return (condition(read_pool(api, name), "MetricsAvailable") or {}).get("status")


async def test_restarted_operator_resumes_without_flapping(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    create_secret(k8s_api, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    manifest = pool_manifest(name, queue, maxReplicas=4, scaleDown={"stabilizationSeconds": 8})
    async with operator(k8s_emulator):
        apply_pool(k8s_api, manifest)
        await wait_for(lambda: _exists(k8s_api, name), timeout=15)
        for _ in range(40):
            sender.send_task(HOLD, (1.0,), queue=queue)
        await wait_for(lambda: deployment(k8s_api, name).spec.replicas == 4, timeout=20)
    # While the operator is away the backlog is worked off; the new one starts with no event history.
    redis.Redis.from_url(redis_url).delete(queue)
    async with operator(k8s_emulator):
        seen = []
        for _ in range(20):  # 5 s, well inside the 8 s down window
            seen.append(deployment(k8s_api, name).spec.replicas)
            await asyncio.sleep(0.25)
        assert set(seen) == {4}, f"the restarted operator changed replicas at once: {seen}"
        await wait_for(lambda: deployment(k8s_api, name).spec.replicas < 4, timeout=30)


async def test_a_spec_the_schema_would_refuse_is_a_condition_not_a_crash(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    """kmock, like a cluster with an old CRD, stores what the schema would refuse: the pool says why."""
    name, queue = names
    create_secret(k8s_api, f"{name}-broker", redis_url)
    async with operator(k8s_emulator):
        apply_pool(k8s_api, pool_manifest(name, queue, minReplicas=5, maxReplicas=2))
        blocked = await wait_for(lambda: condition(read_pool(k8s_api, name), "Ready"), timeout=15)
        assert (blocked["status"], blocked["reason"]) == ("False", "InvalidSpec")
        assert "spec.autoscaling.maxReplicas" in blocked["message"]
        assert await wait_for(lambda: events_named(k8s_api, name, "InvalidSpec"), timeout=10)
        assert not _exists(k8s_api, name), "no Deployment is made from an invalid pool"


async def test_drain_mode_unsubscribes_the_worker_it_removes(
    k8s_emulator: Emulator, k8s_api: client.ApiClient, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    create_secret(k8s_api, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    scaling = {"maxReplicas": 2, "scaleDown": {"stabilizationSeconds": 2, "mode": "drain"}}
    with CeleryWorkers("tests.support.celery_app", redis_url) as workers:
        pods = start_pod_workers(k8s_api, workers, sender, name, queue, concurrency=1)
        async with operator(k8s_emulator):
            apply_pool(k8s_api, pool_manifest(name, queue, **scaling))
            await wait_for(lambda: _exists(k8s_api, name), timeout=15)
            for _ in range(30):  # 30 x 1 s (the prior) / 5 s target = 6 slots: both replicas, whatever is measured
                sender.send_task(HOLD, (0.5,), queue=queue)
            await wait_for(lambda: deployment(k8s_api, name).spec.replicas == 2, timeout=20)
            busy = sender.send_task(HOLD, (30.0,), queue=queue)

            def holder() -> str | None:
                return task_holder(sender, name, pods, busy.id)

            busy_pod = (await wait_for(holder, timeout=30)).partition("@")[2]
            idle_pod = next(p for p in pods if p != busy_pod)
            await wait_for(lambda: deployment(k8s_api, name).spec.replicas == 1, timeout=30)
            assert deletion_cost(k8s_api, idle_pod) == "-1", "the drained pod must be the one the ReplicaSet removes"
            assert int(deletion_cost(k8s_api, busy_pod) or 0) >= 1
            queues = sender.control.inspect(destination=[f"{name}@{idle_pod}"], timeout=2).active_queues() or {}
            assert queues.get(f"{name}@{idle_pod}") == [], "the drained worker still consumes"
            assert holder() == f"{name}@{busy_pod}", "the busy worker's task was not disturbed"
            busy.revoke(terminate=True)
    redis.Redis.from_url(redis_url).delete(queue)
