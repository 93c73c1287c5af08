"""Two teams, one broker: namespaces A and B each run a pool `orders` on the same Redis DB, watched
by one operator process on the real control plane, with a process kubelet per namespace running
real workers. Celery's own inspect (from a separate client) says what each worker has."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kubernetes import client

from celery_worker_operator.control.wire import TASK_INFO, worker_settings
from celery_worker_operator.naming import PoolIdentity
from tests.operator.test_operator import ledger, ready_pods, send_records
from tests.support.celery_app import make_app
from tests.support.cluster import Cluster, fresh_namespace, namespace_name, process_kubelet
from tests.support.kubelet import ProcessKubelet
from tests.support.operator_process import OperatorSetup, operator_setup
from tests.support.pools import apply_pool, condition, create_secret, pool_manifest, read_pool
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(300)
POOL = "orders"
RECORD = "local.record"


@pytest.fixture
def team_b(kube_cluster: Cluster, kube_api: client.ApiClient) -> Iterator[str]:
    with fresh_namespace(kube_cluster, kube_api, namespace_name("team-b")) as name:
        yield name


@pytest.fixture
def two_teams(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str, team_b: str, tmp_path: Path
) -> Iterator[OperatorSetup]:
    with operator_setup(kube_cluster, kube_api, kube_namespace, tmp_path, watched=[team_b]) as setup:
        yield setup


@pytest.fixture
def kubelet_b(kube_cluster: Cluster, team_b: str) -> Iterator[ProcessKubelet]:
    with process_kubelet(kube_cluster, team_b) as node:
        yield node


def orders(queue: str, **autoscaling: Any) -> dict[str, Any]:
    return copy.deepcopy(pool_manifest(POOL, queue, **autoscaling))


def workers_seen(sender: Celery) -> dict[str, tuple[frozenset[str], str | None]]:
    """Per worker on the broker: the queues it consumes and its rate limit of the ledger task."""
    inspect = sender.control.inspect(timeout=2)
    queues, registered = inspect.active_queues() or {}, inspect.registered(*TASK_INFO) or {}
    settings = {h: worker_settings(queues[h], registered[h]) for h in queues if h in registered}
    return {hostname: (seen.queues, seen.rate_limits.get(RECORD)) for hostname, seen in settings.items()}


def status(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    return dict(read_pool(api, namespace, POOL).get("status", {}))


def test_pools_of_one_name_in_two_namespaces_on_one_broker_never_mix(
    two_teams: OperatorSetup,
    kubelet: ProcessKubelet,
    kubelet_b: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    team_b: str,
    redis_url: str,
) -> None:
    a, b = kube_namespace, team_b
    suffix = uuid.uuid4().hex[:6]
    queue_a, queue_b = f"qa-{suffix}", f"qb-{suffix}"
    team_a = {"minReplicas": 2, "maxReplicas": 2, "scaleDown": {"stabilizationSeconds": 2, "mode": "drain"}}
    pool_a = orders(queue_a, **team_a)
    pool_a["spec"]["limits"] = {"rateLimits": {RECORD: "7/m"}}
    for namespace in (a, b):
        create_secret(kube_api, namespace, f"{POOL}-broker", redis_url)
    sender = make_app(redis_url)
    try:
        with two_teams.run() as running:
            apply_pool(kube_api, a, pool_a)
            apply_pool(kube_api, b, orders(queue_b, minReplicas=1, maxReplicas=1))
            for namespace, count in ((a, 2), (b, 1)):
                wait_for(lambda ns=namespace: ready_pods(kube_api, ns, POOL), lambda p, n=count: len(p) == n, 90)
            wait_for(
                lambda: condition(read_pool(kube_api, a, POOL), "LimitsApplied") or {},
                lambda c: c.get("reason") == "Applied",
                timeout=90,
            )
            mine, theirs = PoolIdentity(a, POOL), PoolIdentity(b, POOL)
            seen = wait_for(lambda: workers_seen(sender), lambda w: len(mine.workers(w)) == 2 and theirs.workers(w), 60)
            for hostname in mine.workers(seen):
                assert seen[hostname] == ({queue_a}, "7/m"), f"{hostname}: {seen[hostname]}"
            (b_worker,) = theirs.workers(seen)
            assert seen[b_worker][0] == {queue_b} and seen[b_worker][1] != "7/m", "A's settings reached B's worker"

            send_records(sender, queue_a, range(8), 1.0)
            wait_for(lambda: ledger(redis_url, queue_a, "ended"), lambda done: len(done) == 8, timeout=90)
            counted = wait_for(
                lambda: (status(kube_api, a), status(kube_api, b)),
                lambda s: (s[0].get("arrivalRate") or 0) > 0 and s[0].get("workersOnline") == 2,
                timeout=30,
            )
            assert counted[1].get("workersOnline") == 1, f"B counts only its own worker: {counted[1]}"
            assert not counted[1].get("arrivalRate"), f"A's tasks counted for B: {counted[1]}"

            (b_pod,) = ready_pods(kube_api, b, POOL)
            pool_a["spec"]["autoscaling"].update(minReplicas=1, maxReplicas=1)  # A drains one worker
            apply_pool(kube_api, a, pool_a)
            wait_for(lambda: ready_pods(kube_api, a, POOL), lambda p: len(p) == 1, timeout=90)
            assert kubelet_b.signals(b_pod, b) == [], "A's drain touched B's pod"
            after = wait_for(lambda: workers_seen(sender), lambda w: b_worker in w, timeout=30)
            assert after[b_worker][0] == {queue_b}, "A's drain cancelled B's consumer"
            assert status(kube_api, b).get("workersOnline") == 1
            running.assert_alive()
    finally:
        sender.close()
        redis.Redis.from_url(redis_url).delete(
            *(f"{q}{k}" for q in (queue_a, queue_b) for k in ("", ":started", ":ended"))
        )
