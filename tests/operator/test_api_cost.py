"""What the operator asks of the API server per pass, counted by the real API server (its /metrics).

Passes read Deployments from the operator's watch: N pools polling every second make no GET of a
Deployment per pass, and a burst still scales from the replicas the watch shows.
"""

from __future__ import annotations

import time

import pytest
import redis
from celery import Celery
from kubernetes import client

from tests.support.operator_process import OperatorSetup
from tests.support.pools import apply_pool, create_secret, events_for, pool_manifest, read_pool, replicas
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)
POOLS = 4
WINDOW_SECONDS = 8.0  # about 8 passes per pool at pollSeconds 1
DEPLOYMENT_GET = ('resource="deployments"', 'verb="GET"', 'subresource=""')


def deployment_gets(api: client.ApiClient) -> float:
    """GETs of single Deployments the API server has answered since it started, from every client."""
    response = api.call_api("GET", api.configuration.host + "/metrics")
    response.read()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in response.data.decode().splitlines()
        if line.startswith("apiserver_request_total{") and all(label in line for label in DEPLOYMENT_GET)
    )


def test_pools_make_no_deployment_get_per_pass_and_a_burst_still_scales(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns = kube_namespace
    pools = [(f"{name}-{i}", f"{queue}-{i}") for i in range(POOLS)]
    with operator.run() as running:
        for pool, pool_queue in pools:
            create_secret(kube_api, ns, f"{pool}-broker", redis_url)
            apply_pool(kube_api, ns, pool_manifest(pool, pool_queue, minReplicas=0, maxReplicas=3))
        for pool, _ in pools:
            wait_for(lambda pool=pool: read_pool(kube_api, ns, pool).get("status", {}), bool, timeout=60)
        # A pool's first pass may come before the watch shows the Deployment just created for it:
        # that is no missing workload, and no Warning is raised for it.
        assert not [event for pool, _ in pools for event in events_for(kube_api, ns, pool, "WorkloadMissing")]

        before = deployment_gets(kube_api)
        time.sleep(WINDOW_SECONDS)
        gets = deployment_gets(kube_api) - before
        # One GET per pool per pass would be ~POOLS * WINDOW_SECONDS; a few may come from other clients.
        assert gets < POOLS, f"{gets:.0f} Deployment GETs in {WINDOW_SECONDS:.0f} s of {POOLS} pools polling every 1 s"

        burst, burst_queue = pools[0]
        sender = Celery(broker=redis_url, set_as_current=False)
        for number in range(20):
            sender.send_task("local.record", (burst_queue, number, 1), queue=burst_queue)
        sender.close()
        try:
            wait_for(lambda: replicas(kube_api, ns, burst) or 0, lambda count: count > 0, timeout=30)
        finally:
            redis.Redis.from_url(redis_url).delete(*(pool_queue for _, pool_queue in pools))
        running.assert_alive()
