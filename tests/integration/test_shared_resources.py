"""What pools on one broker share (probe, event monitor, control app) is closed with the last of them,
and its probe series go from /metrics: connections counted on a private Redis, where every client but
the counting one is ours."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_worker_operator.brokers import BrokerUnavailable
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.pool_loop import SharedResources
from celery_worker_operator.reconciler import Sources
from celery_worker_operator.redact import redact
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.local import LocalWorkload
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

pytestmark = pytest.mark.brokers


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with PrivateRedis(tmp_path, secrets.token_urlsafe(12)) as running:
        yield running


def pool(name: str) -> CeleryWorkerPool:
    """A pool as its manifest says (no password there: the tests hand the real URL to the resources)."""
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {
                "broker": {"url": "redis://127.0.0.1/0"},
                "queues": [name],
                "worker": {"app": "app:app", "image": "local"},
            },
        }
    )


def clients(server: PrivateRedis, db: int) -> int:
    """Connections to DB `db` other than the one asking."""
    counter = redis.Redis.from_url(server.url)
    try:
        own = counter.client_id()
        return sum(1 for c in counter.client_list() if int(c["db"]) == db and int(c["id"]) != own)
    finally:
        counter.close()


def probed_brokers(shared: SharedResources) -> set[str]:
    """The brokers /metrics has probe series of."""
    families = text_string_to_metric_families(generate_latest(shared.metrics.registry).decode())
    return {s.labels["broker"] for f in families for s in f.samples if "broker" in s.labels}


def used(shared: SharedResources, name: str, url: str) -> Sources:
    """A pass's worth of use: probe, event stream and a control pass on the broker."""
    parsed = pool(name)
    sources = shared.sources("team", name, (url, None), LocalWorkload(parsed, url))
    sources.probe.stats([name])
    assert sources.limits is not None
    wait_for(lambda: sources.limits(parsed, 0, ()), lambda report: report.reason != "Converging", timeout=30)
    return sources


def test_the_last_pool_on_a_broker_closes_its_connections_and_a_moved_pool_lets_go_of_the_old_one(
    server: PrivateRedis,
) -> None:
    first, second = (server.url.rsplit("/", 1)[0] + f"/{db}" for db in (1, 2))
    shared = SharedResources()
    try:
        deleted = used(shared, "a", first)
        used(shared, "b", first)
        held = wait_for(lambda: clients(server, 1), lambda count: count >= 2, timeout=15)
        shared.release("team", "a")
        assert clients(server, 1) == held, "b still uses the broker: nothing of it is closed"
        with pytest.raises(BrokerUnavailable, match="the pool was deleted"):
            deleted.probe.stats(["a"])  # the deleted pool's last pass reaches nothing any more
        used(shared, "b", second)  # b's broker changed (its Secret, say): the first has no pool left
        wait_for(lambda: clients(server, 1), lambda count: count == 0, timeout=15)
        assert clients(server, 2) > 0 and shared.brokers() == {second}
        assert probed_brokers(shared) == {redact(second)}
        last = used(shared, "b", second)
        shared.release("team", "b")
        wait_for(lambda: clients(server, 2), lambda count: count == 0, timeout=15)
        assert shared.brokers() == set()
        with pytest.raises(BrokerUnavailable):
            last.probe.stats(["b"])
        assert last.limits is not None and last.limits(pool("b"), 1, ()).reason == "PoolDeleted"
        assert clients(server, 2) == 0, "a pass of a released pool opened its broker again"
        assert probed_brokers(shared) == set(), "a released broker's series stay gone, a late pass adds none"
    finally:
        shared.close()


def test_releasing_a_broker_leaves_another_app_of_the_process_publishing_to_it(server: PrivateRedis) -> None:
    """An app that publishes from the operator's process (the demo's, a test's) on the URL of a released
    broker keeps working: the release closes the operator's own connections, not ones that app holds."""
    url = server.url.rsplit("/", 1)[0] + "/3"
    publisher = Celery(broker=url, set_as_current=False)
    shared = SharedResources()
    try:
        publisher.send_task("tasks.quick", queue="kept")
        used(shared, "a", url)
        shared.release("team", "a")
        sent = threading.Thread(
            target=publisher.send_task, args=("tasks.quick",), kwargs={"queue": "kept"}, daemon=True
        )
        sent.start()
        sent.join(timeout=10)
        assert not sent.is_alive(), "the publish after the release hangs"
        assert redis.Redis.from_url(url).llen("kept") == 2
    finally:
        shared.close()
        publisher.close()
