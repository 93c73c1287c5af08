"""`/metrics` during a real run: real Redis, real `celery worker` processes, scraped over HTTP."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.metrics import PoolMetrics
from tests.support.local_app import app, record
from tests.support.local_pool import local_pool_run
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TASKS = 24


@pytest.fixture
def metrics() -> Iterator[tuple[PoolMetrics, int]]:
    exporter = PoolMetrics()
    port = exporter.serve(0, addr="127.0.0.1")
    yield exporter, port
    exporter.stop()


@pytest.fixture
def local_run(redis_url: str, monkeypatch: pytest.MonkeyPatch, metrics: tuple[PoolMetrics, int]) -> Iterator[LocalRun]:
    exporter = metrics[0]
    with local_pool_run(
        redis_url, monkeypatch, "mx", concurrency=2, max_replicas=2, scale_down_seconds=2, metrics=exporter
    ) as run:
        yield run


def scrape(port: int, pool: str) -> dict[str, float]:
    """This pool's pool-level series (and its scale decisions, keyed by direction/reason), over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("pool") == pool:
                extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("namespace", "pool"))
                found[f"{s.name}{{{extra}}}" if extra else s.name] = s.value
    return found


def test_scraped_depth_and_replicas_follow_the_real_queue_and_workers(
    local_run: LocalRun, metrics: tuple[PoolMetrics, int]
) -> None:
    _, port = metrics
    name = local_run.pool.metadata.name
    app.conf.broker_url = os.environ["CELERY_BROKER_URL"]
    with app.producer_or_acquire() as producer:
        for number in range(TASKS):
            record.apply_async((name, number, 0.5), queue=name, producer=producer)
    broker = redis.Redis.from_url(local_run.broker_url)
    assert broker.llen(name) == TASKS

    local_run.step()  # no worker yet: the queue holds every task
    first = scrape(port, name)
    assert first["celery_worker_operator_pool_depth_messages"] == TASKS
    assert first[f"celery_worker_operator_queue_depth_messages{{queue={name}}}"] == TASKS
    assert first["celery_worker_operator_pool_replicas"] == 0
    desired = first["celery_worker_operator_pool_desired_replicas"]
    assert desired == local_run.workload.observe().replicas > 0, "desired is what was started"
    assert first["celery_worker_operator_scale_decisions_total{direction=up,reason=from_zero}"] == 1
    assert first[f"celery_queue_length{{queue_name={name}}}"] == TASKS, "celery-exporter's name, Redis' number"

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and int(broker.llen(f"{name}:ended")) < TASKS:
        time.sleep(1)
        local_run.step()
        now = scrape(port, name)
        assert now["celery_worker_operator_pool_replicas"] == local_run.reporter.status_now["replicas"]
        assert now["celery_worker_operator_pool_depth_messages"] == local_run.reporter.status_now["depth"]
    assert int(broker.llen(f"{name}:ended")) == TASKS, "every task ran"

    task = "{name=local.record}"

    def settled() -> dict[str, float]:  # task events arrive in batches, a little after the tasks end
        local_run.step()
        return scrape(port, name)

    last = wait_for(settled, lambda now: now.get(f"celery_task_succeeded_total{task}") == TASKS, timeout=30, interval=1)
    assert last["celery_worker_operator_pool_depth_messages"] == 0 == broker.llen(name)
    assert last[f"celery_queue_length{{queue_name={name}}}"] == 0
    ledger = int(broker.llen(f"{name}:ended"))
    assert last[f"celery_task_succeeded_total{task}"] == ledger == last[f"celery_task_runtime_count{task}"]
    assert last[f"celery_task_received_total{task}"] == last[f"celery_task_started_total{task}"] == ledger
    assert last[f"celery_task_failed_total{task}"] == 0
    assert last["celery_task_runtime_bucket{le=0.25,name=local.record}"] == 0, "every task sleeps 0.5 s"
    assert last["celery_task_runtime_bucket{le=+Inf,name=local.record}"] == ledger
    assert last[f"celery_task_runtime_sum{task}"] >= 0.5 * ledger
    up = {key for key, value in last.items() if key.startswith("celery_worker_up{") and value == 1}
    assert len(up) == local_run.reporter.status_now["workersOnline"] >= 1
