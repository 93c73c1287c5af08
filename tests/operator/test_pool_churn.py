"""Pools come and go on five brokers (three Redis DBs of a private server, two RabbitMQ vhosts of
their own), created and deleted again and again through the real API server while the operator
process runs; its open connections to each broker must come back to where they started (none:
a broker without pools holds nothing) and its resident memory to its warm level, after round 2.

Why round 2, not start-up: the first rounds grow what is sized by the churn's peak and kept, not
leaked: the pass threads (as many as passes ran at once, at most 32, never shrunk), kopf's pool of
API server connections (unlimited in size, each TLS connection ~130 KiB of buffers) and the
allocator's free lists. Measured at 50 pools with the image's MALLOC_ARENA_MAX=2: +10 MB in round 2, then ~0.2 MB a
round; traced with CWO_CHURN_HEAP=1, live Python objects stay flat between rounds (no pool's status,
body or series kept), the growth being a few more live API connections.

CI runs a short version (10 pools, 4 rounds). The issue's full run is the same test with

    CWO_CHURN_POOLS=50 CWO_CHURN_SECONDS=600 pytest -s tests/operator/test_pool_churn.py

(it prints one line per round: connections per broker at the peak and after, and the RSS). With
CWO_CHURN_HEAP=1 the operator is traced by tracemalloc from the end of round 1 and each later round
also prints its Python-level heap and the allocation sites that grew since the round before: a leak
shows there, the allocator's own growth does not.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import redis
from kubernetes import client

from celery_worker_operator import spec
from tests.support.heap import HeapSnapshots, growth, traced_env, traced_kib
from tests.support.operator_process import OperatorSetup
from tests.support.pools import condition, create_secret
from tests.support.rabbitmq_admin import management_call, temporary_vhost
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

POOLS = int(os.environ.get("CWO_CHURN_POOLS", "10"))
SECONDS = float(os.environ.get("CWO_CHURN_SECONDS", "0"))  # 0: ROUNDS rounds, however long they take
HEAP = os.environ.get("CWO_CHURN_HEAP") == "1"
ROUNDS = 4
WARM_ROUND = 2  # the RSS after it is the level later rounds must come back to
REDIS_DBS = (1, 2, 3)
RSS_TOLERANCE = 0.10
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(600, int(SECONDS * 1.5)))]


@dataclass(frozen=True)
class Broker:
    name: str
    url: str
    connections: Callable[[], int]  # the operator's open connections to it now


def redis_brokers(server: PrivateRedis) -> list[Broker]:
    """One broker per DB of a private server: every client on it but the counting one is the operator's."""
    counter = redis.Redis.from_url(server.url)
    own = counter.client_id()

    def count(db: int) -> int:
        return sum(1 for c in counter.client_list() if int(c["db"]) == db and int(c["id"]) != own)

    base = server.url.rsplit("/", 1)[0]
    return [Broker(f"redis db {db}", f"{base}/{db}", lambda db=db: count(db)) for db in REDIS_DBS]


def rabbitmq_brokers(amqp_url: str, management_url: str, vhosts: list[str]) -> list[Broker]:
    """One broker per vhost made for this test: every connection to it is the operator's."""
    parts = urlsplit(amqp_url)
    base = f"{parts.scheme}://{parts.netloc}"

    def count(vhost: str) -> int:
        return len(management_call(management_url, "GET", f"/api/vhosts/{quote(vhost, safe='')}/connections"))

    return [Broker(f"rabbitmq {v}", f"{base}/{v}", lambda v=v: count(v)) for v in vhosts]


def rss_kib(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


def churn_pool(name: str, secret: str) -> dict[str, Any]:
    """A pool with no workers (0 replicas) and one empty queue: the operator probes and watches its broker."""
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": name},
        "spec": {
            "broker": {"urlFrom": {"secretKeyRef": {"name": secret, "key": "url"}}},
            "queues": [name],
            "worker": {"app": "tests.support.local_app:app", "image": "registry.example/app:1"},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "pollSeconds": 5},
        },
    }


@dataclass
class Round:
    peak: dict[str, int]
    after: dict[str, int]
    rss_kib: int
    seconds: float


@dataclass
class Churn:
    api: client.ApiClient
    namespace: str
    brokers: list[Broker]

    def __post_init__(self) -> None:
        self.objects = client.CustomObjectsApi(self.api)
        self.names: list[str] = []
        for index, broker in enumerate(self.brokers):
            create_secret(self.api, self.namespace, f"broker-{index}", broker.url)

    def connections(self) -> dict[str, int]:
        return {broker.name: broker.connections() for broker in self.brokers}

    def round(self, pools: int, pid: int, start: dict[str, int]) -> Round:
        """Create `pools` pools spread over the brokers, wait until each is measured and every broker
        has connections, delete them all, and wait until the operator's connections are back to `start`."""
        began = time.monotonic()
        self.names = [f"churn-{i}" for i in range(pools)]
        for i, name in enumerate(self.names):
            manifest = churn_pool(name, f"broker-{i % len(self.brokers)}")
            self.objects.create_namespaced_custom_object(
                spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, manifest
            )
        wait_for(self._unmeasured, lambda left: left == [], timeout=300)
        # every broker in use; RabbitMQ's management API lists a new connection a few seconds late
        peak = wait_for(self.connections, lambda now: all(now.values()), timeout=60, interval=1.0)
        for name in self.names:
            self.objects.delete_namespaced_custom_object(spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL, name)
        wait_for(lambda: [p["metadata"]["name"] for p in self._pools()], lambda left: left == [], timeout=300)
        after = wait_for(self.connections, lambda now: now == start, timeout=60, interval=1.0)
        return Round(peak, after, rss_kib(pid), time.monotonic() - began)

    def _unmeasured(self) -> list[str]:
        """Pools not created yet or not measured yet (`MetricsAvailable` not True)."""
        found = {pool["metadata"]["name"]: pool for pool in self._pools()}
        return [name for name in self.names if not _measured(found.get(name, {}))]

    def _pools(self) -> list[dict[str, Any]]:
        listed = self.objects.list_namespaced_custom_object(spec.GROUP, spec.VERSION, self.namespace, spec.PLURAL)
        return list(listed["items"])


def _measured(pool: dict[str, Any]) -> bool:
    metrics = condition(pool, "MetricsAvailable")
    return metrics is not None and metrics["status"] == "True"


@pytest.fixture
def brokers(tmp_path: Path, amqp_url: str, management_url: str) -> Iterator[list[Broker]]:
    with ExitStack() as stack:
        server = stack.enter_context(PrivateRedis(tmp_path, secrets.token_urlsafe(12)))
        vhosts = [stack.enter_context(temporary_vhost(management_url)) for _ in range(2)]
        yield redis_brokers(server) + rabbitmq_brokers(amqp_url, management_url, vhosts)


def test_pools_created_and_deleted_again_and_again_leave_no_connection_and_no_memory_behind(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, brokers: list[Broker], tmp_path: Path
) -> None:
    churn = Churn(kube_api, kube_namespace, brokers)
    heap, snapshots = HeapSnapshots(tmp_path / "heap"), []
    heap.directory.mkdir()
    with operator.run(extra_env=traced_env(heap.directory) if HEAP else None) as running:
        pid = running.popen.pid
        time.sleep(5)  # the operator's start-up (kopf's watches, first list) is not what we measure
        start, cold = churn.connections(), rss_kib(pid)
        assert start == dict.fromkeys(start, 0), f"connections before any pool: {start}"
        began, rounds = time.monotonic(), []
        while len(rounds) < ROUNDS or time.monotonic() - began < SECONDS:
            rounds.append(churn.round(POOLS, pid, start))
            print(f"round {len(rounds)}: {rounds[-1]}")
            if HEAP:
                snapshots.append(heap.take(f"round-{len(rounds)}"))
                print(f"traced heap {traced_kib(snapshots[-1])} KiB")
                if len(snapshots) > 1:
                    print(growth(snapshots[-2], snapshots[-1]))
        running.assert_alive()
    if HEAP:
        print(f"since round 2:\n{growth(snapshots[1], snapshots[-1], top=25)}")  # round 1 ended untraced
    warm = rounds[WARM_ROUND - 1].rss_kib
    print(f"{POOLS} pools x {len(rounds)} rounds in {time.monotonic() - began:.0f} s; RSS cold {cold} KiB, "
          f"after round 1 {rounds[0].rss_kib} KiB, warm (round {WARM_ROUND}) {warm} KiB, "
          f"last {rounds[-1].rss_kib} KiB")  # fmt: skip
    assert all(r.after == start for r in rounds), "a broker kept connections after its last pool went"
    assert abs(rounds[-1].rss_kib - warm) <= RSS_TOLERANCE * warm, f"RSS {warm} -> {rounds[-1].rss_kib} KiB"
