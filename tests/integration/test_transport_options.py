"""An app that changes kombu's Redis layout (priority_steps 0..9, sep ":", a global_keyprefix) is
counted exactly: every priority against kombu's own `_size`, every prefetched task against the
worker's `inspect().reserved()`, the worker started with the arguments the pods get."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from celery_worker_operator.brokers import open_probe
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.command import worker_args
from tests.support.celery_app import HOLD, make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(120)]


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"cwo-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def pool(redis_url: str, prefix: str) -> CeleryWorkerPool:
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": "layout"},
            "spec": {
                "broker": {
                    "url": redis_url,
                    "transportOptions": {
                        "priority_steps": list(range(10)),
                        "sep": ":",
                        "global_keyprefix": prefix,
                        "queue_order_strategy": "priority",
                    },
                },
                "queues": [f"layout-{uuid.uuid4().hex[:8]}"],
                "worker": {"app": "tests.support.celery_app", "image": "unused"},
            },
        }
    )


@pytest.fixture
def app(pool: CeleryWorkerPool) -> Celery:
    app = make_app(pool.spec.broker.url or "")
    assert pool.spec.broker.transport_options is not None
    app.conf.broker_transport_options = pool.spec.broker.transport_options.as_celery()
    return app


def kombu_size(app: Celery, queue: str) -> int:
    with app.connection_for_write() as connection:
        return int(connection.default_channel._size(queue))


def test_every_priority_is_counted_as_kombu_counts_it(pool: CeleryWorkerPool, app: Celery, prefix: str) -> None:
    queue = pool.spec.queues[0]
    for priority in range(10):
        for _ in range(priority + 1):
            app.send_task(HOLD, args=[0], queue=queue, priority=priority)
    probe = open_probe(pool.spec.broker.url or "", None, pool.spec.broker.transport_options)
    stats = probe.stats([queue])[queue]
    probe.close()
    assert stats.priorities == {priority: priority + 1 for priority in range(10)}
    assert stats.depth == kombu_size(app, queue) == 55
    client = redis.Redis.from_url(pool.spec.broker.url or "")
    assert client.llen(f"{prefix}{queue}:9") == 10, "the keys are where kombu wrote them"
    client.close()
    default = open_probe(pool.spec.broker.url or "")
    assert default.stats([queue])[queue].depth == 0, "without the options nothing would be seen"
    default.close()


def test_prefetched_tasks_match_the_workers_reserved(pool: CeleryWorkerPool, app: Celery) -> None:
    queue = pool.spec.queues[0]
    assert pool.spec.worker is not None
    settings = dict(
        arg.split("=", 1) for arg in worker_args(pool.identity, "0", pool.spec, pool.spec.worker) if "_options=" in arg
    )
    assert "broker_transport_options" in settings, "the pods get the same options"
    probe = open_probe(pool.spec.broker.url or "", None, pool.spec.broker.transport_options)
    with CeleryWorkers("tests.support.celery_app", pool.spec.broker.url or "") as workers:
        worker = workers.start(
            f"layout@{uuid.uuid4().hex[:8]}", [queue], concurrency=1, prefetch_multiplier=4, settings=settings
        )
        workers.wait_ready(app, worker)
        for priority in range(10):
            app.send_task(HOLD, args=[60], queue=queue, priority=priority)

        def both() -> tuple[int | None, int, int, int]:
            reserved = (app.control.inspect([worker], timeout=1).reserved() or {}).get(worker, [])
            stats = probe.stats([queue])[queue]
            return stats.reserved, len(reserved), stats.depth, kombu_size(app, queue)

        ours, theirs, depth, size = wait_for(both, lambda v: v[0] == v[1] > 0 and v[2] == v[3], timeout=45)
        assert ours == theirs and depth == size
        assert ours is not None and ours + depth == 9  # 10 sent, 1 running: the rest wait or are prefetched
    probe.close()
