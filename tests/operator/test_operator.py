"""The operator as a platform team runs it, on a real control plane (etcd, kube-apiserver,
kube-controller-manager), with real Redis and real `celery worker` processes as the pool's pods.

`celery-worker-operator run --namespace NS` runs in its own process as the chart's ServiceAccount;
the ReplicaSet controller, not the test, picks the pods to remove; the process kubelet runs each
pod's own command and env and stops it as a kubelet does (SIGTERM, grace period, SIGKILL).
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kubernetes import client

from celery_worker_operator import spec
from celery_worker_operator.naming import PoolIdentity, member_of
from celery_worker_operator.policy import DecisionKind
from celery_worker_operator.workloads.kubernetes import BROKER_ENV, DELETION_COST
from tests.support.celery_app import make_app
from tests.support.kubelet import ProcessKubelet
from tests.support.operator_process import OperatorSetup
from tests.support.pools import (
    apply_pool,
    condition,
    create_secret,
    deployment,
    events_for,
    pool_manifest,
    read_pool,
    replicas,
)
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
RECORD = "local.record"  # tests.support.local_app: rpush <key>:started / <key>:ended around its sleep


def ledger(redis_url: str, queue: str, which: str) -> Counter[int]:
    """How often each task number started or ended, from the tasks' own records in Redis."""
    return Counter(int(n) for n in redis.Redis.from_url(redis_url).lrange(f"{queue}:{which}", 0, -1))


def send_records(sender: Celery, queue: str, numbers: range, seconds: float) -> None:
    for number in numbers:
        sender.send_task(RECORD, (queue, number, seconds), queue=queue)


def ready_pods(api: client.ApiClient, namespace: str, pool: str) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in pods(api, namespace, pool)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def pods(api: client.ApiClient, namespace: str, pool: str) -> list[dict[str, Any]]:
    return [p for p in _pods(api, namespace) if p["metadata"].get("labels", {}).get("celery-operator.dev/pool") == pool]


def _pods(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    return list(json.loads(client.CoreV1Api(api).list_namespaced_pod(namespace, _preload_content=False).data)["items"])


def worker_running(sender: Celery, pool: PoolIdentity, queue: str, number: int) -> str | None:
    """The pod whose worker is running ledger task `number` of `queue` now, if any."""
    active = sender.control.inspect(timeout=1).active() or {}
    for hostname, tasks in active.items():
        if pool.workers([hostname]) and any(list(t["args"])[:2] == [queue, number] for t in tasks):
            return member_of(hostname)
    return None


def test_managed_pool_runs_real_workers_and_reports_status(
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
    with operator.run() as running:
        apply_pool(kube_api, ns, pool_manifest(name, queue))
        made = wait_for(lambda: deployment(kube_api, ns, name), bool, timeout=30)
        owner = made["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == (spec.KIND, name, True)
        container = made["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["celery"] and f"{name}.{ns}@$(POD_NAME)" in container["args"]
        broker_env = next(e for e in container["env"] if e["name"] == BROKER_ENV)
        assert broker_env["valueFrom"]["secretKeyRef"]["name"] == f"{name}-broker"
        # The ReplicaSet controller makes the pod, the kubelet runs its real worker from the pod's own command.
        (pod,) = wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        status = wait_for(
            lambda: read_pool(kube_api, ns, name).get("status", {}), lambda s: s.get("workersOnline") == 1, timeout=60
        )
        assert status["queues"][0]["name"] == queue and status["readyReplicas"] == 1
        assert condition(read_pool(kube_api, ns, name), "MetricsAvailable")["status"] == "True"  # type: ignore[index]
        assert f"{name}.{ns}@{pod}" in kubelet.log(pod, ns), "the worker is named after its pool, namespace and pod"

        table = operator.cluster.kubectl("get", "cwp", "-n", ns, name)
        header, row = (line.split() for line in table.splitlines()[:2])
        assert header == ["NAME", "QUEUES", "DEPTH", "WAIT", "REPLICAS", "DESIRED", "MODE", "AGE"]
        assert (row[0], row[2], row[4], row[5]) == (name, "0", "1", "1") and queue in row[1], table

        changed = copy.deepcopy(pool_manifest(name, queue))
        changed["spec"]["worker"]["concurrency"] = 5
        apply_pool(kube_api, ns, changed)
        wait_for(lambda: (deployment(kube_api, ns, name) or {})["spec"]["template"]["spec"]["containers"][0]["args"],
                 lambda args: "5" in args, timeout=30)  # fmt: skip

        # A managed Deployment deleted by hand comes back, as a ReplicaSet's pods do, and is not "missing".
        old_uid = made["metadata"]["uid"]
        client.AppsV1Api(kube_api).delete_namespaced_deployment(name, ns)
        back = wait_for(lambda: deployment(kube_api, ns, name), lambda d: d and d["metadata"]["uid"] != old_uid,
                        timeout=30)  # fmt: skip
        assert back["metadata"]["ownerReferences"][0]["name"] == name
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        assert not events_for(kube_api, ns, name, "WorkloadMissing")
        running.assert_alive()


def test_burst_scales_up_and_the_replicaset_removes_only_idle_pods(
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
    scaling = {"maxReplicas": 3, "scaleDown": {"stabilizationSeconds": 3}}
    with operator.run() as running:
        apply_pool(kube_api, ns, pool_manifest(name, queue, **scaling))
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        send_records(sender, queue, range(30), 1.0)  # 30 x 1 s / 5 s target = 6 slots = 3 replicas of 2
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 3, timeout=30)
        up = wait_for(lambda: events_for(kube_api, ns, name, "ScaledUp"), bool, timeout=10)
        assert "waiting" in up[0]["message"] and "slots" in up[0]["message"], up
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 3, timeout=60)

        send_records(sender, queue, range(30, 31), 25.0)  # one long task: its pod must survive the scale-down
        busy_pod = wait_for(lambda: worker_running(sender, PoolIdentity(ns, name), queue, 30), bool, timeout=60)
        wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) >= 30, timeout=90)
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 1, timeout=60)
        survivors = wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 1, timeout=60)
        assert survivors == [busy_pod], "the ReplicaSet removed the busy pod"
        assert kubelet.signals(busy_pod, ns) == [], "the busy pod was sent a signal"
        pod = client.CoreV1Api(kube_api).read_namespaced_pod(busy_pod, ns)
        assert int((pod.metadata.annotations or {}).get(DELETION_COST, "0")) >= 1

        wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: len(done) == 31, timeout=60)
        started, ended = ledger(redis_url, queue, "started"), ledger(redis_url, queue, "ended")
        assert started == ended == Counter(range(31)), "a task was interrupted, lost or run twice"
        assert events_for(kube_api, ns, name, "ScaledDown"), "the scale-down was not explained"
        last = read_pool(kube_api, ns, name)["status"]["lastDecision"]
        assert last["to"] == 1 and last["kind"] in set(DecisionKind) and last["limit"], last
        assert condition(read_pool(kube_api, ns, name), "Ready")["status"] == "True"  # type: ignore[index]
        running.assert_alive()


def test_deleting_the_pool_collects_its_deployment_and_stops_its_workers(
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
    with operator.run():
        apply_pool(kube_api, ns, pool_manifest(name, queue, minReplicas=2))
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 2, timeout=60)
        client.CustomObjectsApi(kube_api).delete_namespaced_custom_object(
            spec.GROUP, spec.VERSION, ns, spec.PLURAL, name
        )
        wait_for(lambda: deployment(kube_api, ns, name), lambda d: d is None, timeout=60)
        wait_for(lambda: pods(kube_api, ns, name), lambda p: p == [], timeout=90)
        assert kubelet.running() == {}, "a worker process outlived its pod"


def adopted_deployment(name: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "metadata": {"name": name, "labels": labels, "annotations": {"owner": "team-chart"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "w", "image": "team/app:3", "args": ["celery", "worker", "-c", "3"]}]},
            },
        },
    }


def test_adopted_deployment_only_changes_replicas(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns, apps = kube_namespace, client.AppsV1Api(kube_api)
    apps.create_namespaced_deployment(ns, adopted_deployment(f"{name}-app"))
    before = deployment(kube_api, ns, f"{name}-app")
    manifest = pool_manifest(name, queue, minReplicas=3, maxReplicas=5)
    del manifest["spec"]["worker"]
    manifest["spec"]["scaleTargetRef"] = {"name": f"{name}-app"}
    manifest["spec"]["broker"] = {"url": redis_url}
    with operator.run():
        apply_pool(kube_api, ns, manifest)
        wait_for(lambda: replicas(kube_api, ns, f"{name}-app"), lambda r: r == 3, timeout=30)
        time.sleep(3)  # a few more passes: nothing else may change
    after = deployment(kube_api, ns, f"{name}-app")
    assert before is not None and after is not None
    assert after["spec"]["template"] == before["spec"]["template"]
    assert after["metadata"]["labels"] == before["metadata"]["labels"]
    assert after["metadata"]["annotations"].get("owner") == "team-chart"
    assert not after["metadata"].get("ownerReferences"), "an adopted Deployment must not be owned by the pool"
    assert deployment(kube_api, ns, name) is None, "an adopted pool must not get a managed Deployment"


def test_missing_secret_is_a_condition_and_one_event_and_other_pools_go_on(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-ok-broker", redis_url)
    with operator.run():
        apply_pool(kube_api, ns, pool_manifest(name, queue))  # its Secret was never made
        apply_pool(kube_api, ns, pool_manifest(f"{name}-ok", queue))
        blocked = wait_for(lambda: condition(read_pool(kube_api, ns, name), "Ready"), bool, timeout=30)
        assert (blocked["status"], blocked["reason"]) == ("False", "SecretMissing")
        assert f"{name}-broker" in blocked["message"]
        wait_for(lambda: events_for(kube_api, ns, name, "SecretMissing"), bool, timeout=10)
        fine = wait_for(lambda: condition(read_pool(kube_api, ns, f"{name}-ok"), "MetricsAvailable"), bool, timeout=30)
        assert fine["status"] == "True"
        create_secret(kube_api, ns, f"{name}-broker", redis_url)
        wait_for(
            lambda: condition(read_pool(kube_api, ns, name), "Ready") or {},
            lambda c: c.get("status") == "True",
            timeout=30,
        )
        warnings = events_for(kube_api, ns, name, "SecretMissing")
        assert len(warnings) == 1 and warnings[0]["type"] == "Warning", "one Warning when blocked, not one per poll"


def metrics_status(api: client.ApiClient, namespace: str, name: str) -> str | None:
    return (condition(read_pool(api, namespace, name), "MetricsAvailable") or {}).get("status")


def ready_status(api: client.ApiClient, namespace: str, name: str) -> str | None:
    return (condition(read_pool(api, namespace, name), "Ready") or {}).get("status")


def status_of(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(read_pool(api, namespace, name).get("status", {}))


def test_broker_outage_holds_replicas_and_recovers(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, tmp_path: Path, names: tuple[str, str]
) -> None:
    name, queue = names
    ns = kube_namespace
    with PrivateRedis(tmp_path, password="outage-s3cret") as private:
        create_secret(kube_api, ns, f"{name}-broker", private.url)
        with operator.run():
            apply_pool(kube_api, ns, pool_manifest(name, queue, minReplicas=2))
            wait_for(lambda: metrics_status(kube_api, ns, name), lambda s: s == "True", timeout=30)
            private.stop()
            down = wait_for(lambda: condition(read_pool(kube_api, ns, name), "MetricsAvailable"),
                            lambda c: c["status"] == "False", timeout=30)  # fmt: skip
            assert down["reason"] == "BrokerUnavailable"
            assert "outage-s3cret" not in json.dumps(read_pool(kube_api, ns, name)), "a password reached the status"
            assert replicas(kube_api, ns, name) == 2, "blind, the pool must hold its replicas"
            private.start()
            wait_for(lambda: metrics_status(kube_api, ns, name), lambda s: s == "True", timeout=45)
    assert all("outage-s3cret" not in e["message"] for e in events_for(kube_api, ns, name))


def test_restarted_operator_resumes_without_flapping(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    with operator.run():
        apply_pool(kube_api, ns, pool_manifest(name, queue, maxReplicas=4, scaleDown={"stabilizationSeconds": 8}))
        wait_for(lambda: deployment(kube_api, ns, name), bool, timeout=30)
        send_records(sender, queue, range(40), 1.0)
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 4, timeout=30)
    # While the operator is away the backlog is worked off; the new one starts with no event history.
    redis.Redis.from_url(redis_url).delete(queue)
    with operator.run():
        seen = []
        for _ in range(20):  # 5 s, well inside the 8 s down window
            seen.append(replicas(kube_api, ns, name))
            time.sleep(0.25)
        assert set(seen) == {4}, f"the restarted operator changed replicas at once: {seen}"
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r is not None and r < 4, timeout=45)


def test_operator_rides_out_an_api_server_restart(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    """kube-apiserver restarts under a running operator: its watches reconnect and the next burst is
    still seen and acted on, with one Event per scale and no duplicate."""
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    sender = make_app(redis_url)
    with operator.run() as running:
        apply_pool(kube_api, ns, pool_manifest(name, queue, minReplicas=1, maxReplicas=3))
        wait_for(lambda: metrics_status(kube_api, ns, name), lambda s: s == "True", timeout=30)
        restart = subprocess.run(["bash", "scripts/cluster.sh", "restart-apiserver"], capture_output=True, text=True,
                                 timeout=180, cwd=Path(__file__).resolve().parents[2], check=False)  # fmt: skip
        assert restart.returncode == 0, restart.stdout + restart.stderr
        send_records(sender, queue, range(30), 1.0)
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 3, timeout=60)
        ups = wait_for(lambda: events_for(kube_api, ns, name, "ScaledUp"), bool, timeout=20)
        assert len(ups) == 1, f"one scale-up, one Event: {[e['message'] for e in ups]}"
        running.assert_alive()


def test_drain_mode_unsubscribes_the_worker_it_removes(
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
    scaling = {"minReplicas": 2, "maxReplicas": 2, "scaleDown": {"stabilizationSeconds": 2, "mode": "drain"}}
    with operator.run():
        apply_pool(kube_api, ns, pool_manifest(name, queue, **scaling))
        pods_up = wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: len(p) == 2, timeout=60)
        wait_for(
            lambda: read_pool(kube_api, ns, name).get("status", {}), lambda s: s.get("workersOnline") == 2, timeout=60
        )
        send_records(sender, queue, range(1), 30.0)
        busy_pod = wait_for(lambda: worker_running(sender, PoolIdentity(ns, name), queue, 0), bool, timeout=60)
        idle_pod = next(p for p in pods_up if p != busy_pod)
        manifest = pool_manifest(name, queue, **{**scaling, "minReplicas": 1})
        apply_pool(kube_api, ns, manifest)
        wait_for(lambda: replicas(kube_api, ns, name), lambda r: r == 1, timeout=60)
        wait_for(lambda: ready_pods(kube_api, ns, name), lambda p: p == [busy_pod], timeout=60)
        # ready_pods drops a pod once it is marked for deletion, a moment before the kubelet signals it
        wait_for(lambda: kubelet.signals(idle_pod, ns)[:1], lambda sent: sent == ["SIGTERM"], timeout=30)
        assert kubelet.signals(busy_pod, ns) == [], "the busy worker was disturbed"
        still = worker_running(sender, PoolIdentity(ns, name), queue, 0)
        assert still == busy_pod, "the busy worker's task was not left alone"
        wait_for(lambda: ledger(redis_url, queue, "ended"), lambda done: done == Counter([0]), timeout=60)
