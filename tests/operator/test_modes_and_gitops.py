"""The operator beside the tools a platform team runs, on the real control plane with real workers:
a GitOps controller re-applying the adopted Deployment (server-side apply under its own field manager,
as Argo CD does), a managed pool whose template loses a field, recommend-only mode beside a fixed
Deployment, the pause annotation, and `kubectl scale cwp` with autoscaling off.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery import Celery
from kubernetes import client

from celery_worker_operator import spec
from celery_worker_operator.naming import PoolIdentity
from celery_worker_operator.workloads.kubernetes import APPLY, FIELD_MANAGER
from tests.operator.test_operator import ledger, ready_pods, send_records
from tests.support.celery_app import make_app
from tests.support.kubelet import ProcessKubelet
from tests.support.operator_process import OperatorSetup
from tests.support.pools import (
    LEDGER_APP,
    apply_pool,
    condition,
    create_secret,
    deployment,
    events_for,
    pool_manifest,
    read_pool,
    replicas,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
GITOPS_MANAGER = "argocd-controller"  # the field manager Argo CD applies with (server-side, with force)
SYNC_SECONDS = 5.0
RECORD_TASK = "local.record"
PAUSED = spec.PAUSED_ANNOTATION


def worker_deployment(name: str, pool: PoolIdentity, queue: str, redis_url: str, count: int | None) -> dict[str, Any]:
    """A team's own worker Deployment, as its Git repository holds it: real Celery workers named as
    the pool's (the operator finds a pool's workers by that name); `count` None leaves replicas
    out of the manifest, as README's GitOps section advises for a Deployment the pool scales."""
    labels = {"app": name}
    args = ["-A", LEDGER_APP, "worker", "-Q", queue, "-c", "2", "-n", pool.hostname("$(POD_NAME)"), "-E"]
    container = {
        "name": "worker",
        "image": "team/app:3",
        "command": ["celery"],
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "CELERY_BROKER_URL", "value": redis_url},
        ],
    }
    manifest: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }
    if count is not None:
        manifest["spec"]["replicas"] = count
    return manifest


def adopting_pool(name: str, target: str, queue: str, redis_url: str, **autoscaling: Any) -> dict[str, Any]:
    manifest = pool_manifest(name, queue, **autoscaling)
    del manifest["spec"]["worker"]
    manifest["spec"]["scaleTargetRef"] = {"name": target}
    manifest["spec"]["broker"] = {"url": redis_url}
    return manifest


def server_side_apply(api: client.ApiClient, namespace: str, manifest: dict[str, Any], manager: str) -> None:
    """What Argo CD does on a sync with ServerSideApply=true: apply the manifest, forcing conflicts."""
    body: Any = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
    client.AppsV1Api(api).patch_namespaced_deployment(
        manifest["metadata"]["name"], namespace, body, field_manager=manager, _content_type=APPLY, force=True
    )


@contextmanager
def gitops_sync(api: client.ApiClient, namespace: str, manifest: dict[str, Any]) -> Iterator[list[float]]:
    """The manifest re-applied every SYNC_SECONDS until the block ends; yields the times of the syncs."""
    synced: list[float] = []
    stop = threading.Event()

    def sync() -> None:
        while not stop.is_set():
            server_side_apply(api, namespace, manifest, GITOPS_MANAGER)
            synced.append(time.monotonic())
            stop.wait(SYNC_SECONDS)

    thread = threading.Thread(target=sync, daemon=True)
    thread.start()
    try:
        yield synced
    finally:
        stop.set()
        thread.join(30)


@contextmanager
def replica_history(read: Callable[[], int | None]) -> Iterator[list[int]]:
    """Every distinct replica count in a row, sampled every 0.2 s until the block ends."""
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = read()
            if value is not None and (not seen or seen[-1] != value):
                seen.append(value)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)


def reversals(counts: list[int]) -> int:
    """How often the direction of change flips: 1 -> 3 -> 1 is one, 1 -> 3 -> 1 -> 3 is two."""
    directions = [b > a for a, b in itertools.pairwise(counts)]
    return sum(1 for a, b in itertools.pairwise(directions) if a != b)


def annotate(api: client.ApiClient, namespace: str, name: str, annotations: dict[str, str | None]) -> None:
    """Set (or, with None, remove) annotations of a pool, as `kubectl annotate` does."""
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, name, {"metadata": {"annotations": annotations}}
    )


def rate_limits(sender: Celery, pool: PoolIdentity) -> dict[str, str]:
    """Each of the pool's workers' rate limit of the ledger task, as the worker itself reports it."""
    registered = sender.control.inspect(timeout=1).registered("rate_limit") or {}
    return {
        hostname: next((t for t in tasks if t.startswith("local.record")), "")
        for hostname, tasks in registered.items()
        if pool.workers([hostname])
    }


def test_a_gitops_tool_reapplying_an_adopted_deployment_without_replicas_does_not_fight_the_pool(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
) -> None:
    name, queue = names
    ns, target = kube_namespace, f"{names[0]}-app"
    sender = make_app(redis_url)
    manifest = worker_deployment(target, PoolIdentity(ns, name), queue, redis_url, count=None)
    with gitops_sync(kube_api, ns, manifest) as synced, operator.run() as running:
        scaling = {"maxReplicas": 3, "scaleDown": {"stabilizationSeconds": 3}}
        apply_pool(kube_api, ns, adopting_pool(name, target, queue, redis_url, **scaling))
        wait_for(lambda: ready_pods_of(kube_api, ns, target), lambda p: len(p) == 1, timeout=60)
        wait_for(lambda: measured(kube_api, ns, name), bool, timeout=60)  # the operator is up and sizing
        with replica_history(lambda: replicas(kube_api, ns, target)) as seen:
            send_records(sender, queue, range(30), 1.0)  # 30 x 1 s / 5 s target wait: 3 workers of 2
            wait_for(lambda: replicas(kube_api, ns, target), lambda r: r == 3, timeout=60)
            wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) >= 30, timeout=120)
            wait_for(lambda: replicas(kube_api, ns, target), lambda r: r == 1, timeout=60)
            time.sleep(SYNC_SECONDS + 1)  # one more sync after the last scale: nothing moves
        running.assert_alive()
    assert len(synced) >= 4, f"the GitOps loop synced only {len(synced)} times"
    assert seen[0] == 1 and max(seen) == 3 and seen[-1] == 1, seen
    assert reversals(seen) == 1 and len(seen) <= 5, f"replicas oscillated: {seen}"
    assert ledger(redis_url, queue, "started") == ledger(redis_url, queue, "ended") == Counter(range(30))
    able = condition(read_pool(kube_api, ns, name), "AbleToScale")
    assert able is not None and able["status"] == "True", able
    entries = (deployment(kube_api, ns, target) or {"metadata": {}})["metadata"].get("managedFields", [])
    managers = {(m["manager"], m.get("subresource", "")) for m in entries}
    assert {(GITOPS_MANAGER, ""), (FIELD_MANAGER, "scale")} <= managers, managers


def ready_pods_of(api: client.ApiClient, namespace: str, deployment_name: str) -> list[str]:
    """The running pods of a team's own Deployment (label app=<name>), not marked for deletion."""
    response: Any = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"app={deployment_name}", _preload_content=False
    )
    return [
        p["metadata"]["name"]
        for p in json.loads(response.data)["items"]
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def test_a_gitops_manifest_that_sets_replicas_is_a_condition_and_one_warning_not_a_fight(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
) -> None:
    name, queue = names
    ns, target = kube_namespace, f"{names[0]}-app"
    sender = make_app(redis_url)
    manifest = worker_deployment(target, PoolIdentity(ns, name), queue, redis_url, count=1)
    with gitops_sync(kube_api, ns, manifest) as synced, operator.run() as running:
        apply_pool(kube_api, ns, adopting_pool(name, target, queue, redis_url, maxReplicas=3))
        wait_for(lambda: measured(kube_api, ns, name), bool, timeout=60)  # the operator is up and sizing
        with replica_history(lambda: replicas(kube_api, ns, target)) as seen:
            send_records(sender, queue, range(12), 0.5)  # it would want 2 workers
            conflict = wait_for(
                lambda: condition(read_pool(kube_api, ns, name), "AbleToScale") or {},
                lambda c: c.get("status") == "False",
                timeout=30,
            )
            wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) >= 12, timeout=90)
            wait_for(lambda: len(synced), lambda n: n >= 3, timeout=30)
        running.assert_alive()
    assert seen == [1], f"the pool fought the GitOps tool over replicas: {seen}"
    assert conflict["reason"] == "FieldConflict" and GITOPS_MANAGER in conflict["message"], conflict
    warnings = events_for(kube_api, ns, name, "FieldConflict")
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert not events_for(kube_api, ns, name, "ScaledUp")
    assert ledger(redis_url, queue, "ended") == Counter(range(12))


def test_a_field_dropped_from_worker_template_leaves_the_managed_deployment(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    manifest = pool_manifest(name, queue, minReplicas=2)
    manifest["spec"]["worker"]["template"] = {
        "metadata": {"labels": {"team": "checkout"}},
        "spec": {"containers": [{"name": "worker", "env": [{"name": "FEATURE_X", "value": "on"}]}]},
    }

    def env_names() -> list[str]:
        found = deployment(kube_api, ns, name) or {"spec": {"template": {"spec": {"containers": [{}]}}}}
        return [e["name"] for e in found["spec"]["template"]["spec"]["containers"][0].get("env", [])]

    def labels() -> dict[str, str]:
        found = deployment(kube_api, ns, name) or {"spec": {"template": {"metadata": {}}}}
        return dict(found["spec"]["template"]["metadata"].get("labels", {}))

    with operator.run() as running:
        apply_pool(kube_api, ns, manifest)
        wait_for(env_names, lambda env: "FEATURE_X" in env, timeout=30)
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 2, timeout=30)
        assert labels().get("team") == "checkout"
        dropped = copy.deepcopy(manifest)
        dropped["spec"]["worker"]["template"] = None  # apply_pool merge-patches: null removes the template
        apply_pool(kube_api, ns, dropped)
        wait_for(env_names, lambda env: "FEATURE_X" not in env, timeout=30)
        assert "team" not in labels() and "POD_NAME" in env_names(), "only the dropped fields may go"
        assert replicas(kube_api, ns, name) == 2, "applying the template must leave the replica count alone"
        # written with the status of the pass after the apply
        applied = wait_for(lambda: condition(read_pool(kube_api, ns, name), "WorkloadApplied") or {}, bool, timeout=30)
        assert applied["status"] == "True", applied
        running.assert_alive()


def test_recommend_mode_beside_a_fixed_deployment_tells_and_never_scales(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
) -> None:
    name, queue = names
    ns, target = kube_namespace, f"{names[0]}-app"
    sender = make_app(redis_url)
    fixed: Any = worker_deployment(
        target, PoolIdentity(ns, name), queue, redis_url, 1
    )  # the client takes plain dicts as bodies
    client.AppsV1Api(kube_api).create_namespaced_deployment(ns, fixed)
    scaling = {"mode": "recommend", "maxReplicas": 4, "scaleDown": {"stabilizationSeconds": 3}}
    with operator.run() as running:
        apply_pool(kube_api, ns, adopting_pool(name, target, queue, redis_url, **scaling))
        wait_for(lambda: ready_pods_of(kube_api, ns, target), lambda p: len(p) == 1, timeout=60)
        wait_for(lambda: measured(kube_api, ns, name), bool, timeout=60)  # the operator is up and sizing
        with replica_history(lambda: replicas(kube_api, ns, target)) as seen:
            send_records(sender, queue, range(24), 1.0)
            desired = wait_for(
                lambda: status(kube_api, ns, name).get("desiredReplicas", 0), lambda d: d >= 3, timeout=30
            )
            ups = wait_for(lambda: events_for(kube_api, ns, name, "WouldScaleUp"), bool, timeout=10)
            wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) >= 24, timeout=120)
            wait_for(lambda: status(kube_api, ns, name).get("desiredReplicas"), lambda d: d == 1, timeout=60)
            downs = wait_for(lambda: events_for(kube_api, ns, name, "WouldScaleDown"), bool, timeout=10)
        running.assert_alive()
    assert seen == [1], f"recommend mode changed replicas: {seen}"
    # Events come back in name order, not time order: look for the first step up and the last step down.
    assert any(e["message"].startswith("would scale up 1 -> ") for e in ups) and desired >= 3, ups
    assert any(e["message"].split(":")[0].endswith("-> 1") for e in downs), downs
    assert not events_for(kube_api, ns, name, "ScaledUp") and not events_for(kube_api, ns, name, "ScaledDown")
    pool = read_pool(kube_api, ns, name)
    assert pool["status"]["mode"] == "Recommend" and condition(pool, "LimitsApplied")["status"] == "Unknown"  # type: ignore[index]
    assert "lastDecision" not in pool["status"], "nothing was carried out"


def status(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(read_pool(api, namespace, name).get("status", {}))


def measured(api: client.ApiClient, namespace: str, name: str) -> bool:
    """The pool's queues were measured: its loop runs (a loaded machine may take long to start the operator)."""
    return (condition(read_pool(api, namespace, name), "MetricsAvailable") or {}).get("status") == "True"


def test_the_pause_annotation_stops_scaling_and_broadcasts_until_removed(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
) -> None:
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    manifest = pool_manifest(name, queue, maxReplicas=3)
    manifest["spec"]["limits"] = {"rateLimits": {RECORD_TASK: "100/m"}}
    with operator.run() as running:
        apply_pool(kube_api, ns, manifest)
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        wait_for(
            lambda: rate_limits(sender, PoolIdentity(ns, name)), lambda r: "rate_limit=100/m" in str(r), timeout=60
        )
        annotate(kube_api, ns, name, {PAUSED: "true"})
        wait_for(lambda: status(kube_api, ns, name).get("mode"), lambda m: m == "Paused", timeout=30)
        changed = copy.deepcopy(manifest)
        changed["spec"]["limits"] = {"rateLimits": {RECORD_TASK: "50/m"}}
        apply_pool(kube_api, ns, changed)
        send_records(sender, queue, range(20), 1.0)  # a burst that would call for 3 workers
        time.sleep(6)  # several passes (pollSeconds 1) and control rounds
        assert replicas(kube_api, ns, name) == 1, "a paused pool scaled"
        assert all("100/m" in limit for limit in rate_limits(sender, PoolIdentity(ns, name)).values()), rate_limits(
            sender, PoolIdentity(ns, name)
        )
        paused = condition(read_pool(kube_api, ns, name), "Paused")
        assert paused is not None and (paused["status"], paused["reason"]) == ("True", "PausedByAnnotation")
        annotate(kube_api, ns, name, {PAUSED: None})
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r is not None and r > 1, timeout=30)
        wait_for(lambda: rate_limits(sender, PoolIdentity(ns, name)), lambda r: "rate_limit=50/m" in str(r), timeout=60)
        wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) >= 20, timeout=120)
        assert ledger(redis_url, queue, "ended") == Counter(range(20))
        running.assert_alive()


def test_kubectl_scale_cwp_sets_the_workers_while_autoscaling_is_off(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
) -> None:
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    manifest = pool_manifest(name, queue, enabled=False)
    manifest["spec"]["replicas"] = 1
    with operator.run() as running:
        apply_pool(kube_api, ns, manifest)
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        operator.cluster.kubectl("scale", "cwp", name, "-n", ns, "--replicas", "3")
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 3, timeout=60)
        wait_for(lambda: status(kube_api, ns, name).get("workersOnline"), lambda n: n == 3, timeout=60)
        table = operator.cluster.kubectl("get", "cwp", "-n", ns, name)
        assert table.splitlines()[1].split()[4:7] == ["3", "3", "Manual"], table
        last = status(kube_api, ns, name)["lastDecision"]
        assert (last["from"], last["to"], last["kind"]) == (1, 3, "Disabled"), last
        running.assert_alive()
