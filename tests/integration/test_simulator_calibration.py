"""The simulator against real workers: one trace on a fixed pool of real `celery worker` processes
and through the simulator with the measured constants; their waits must agree within 15 %."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import redis

from celery_worker_operator.demo.app import app, work
from celery_worker_operator.simulation.baselines import FixedScaler
from celery_worker_operator.simulation.engine import LOCAL_STARTUP_SECONDS, PoolModel, Task, percentile, simulate
from celery_worker_operator.workloads.local import LocalWorkload
from tests.support.local_pool import local_pool_run

APP = "celery_worker_operator.demo.app:app"
WORKERS, CONCURRENCY, TASKS = 3, 4, 180


@pytest.fixture
def workload(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalWorkload]:
    """A pool's workload only: the test starts its workers itself, no loop sizes it."""
    with local_pool_run(
        redis_url, monkeypatch, "calib", concurrency=CONCURRENCY, max_replicas=WORKERS, scale_down_seconds=0, app=APP
    ) as run:
        yield run.workload


def run_for_real(workload: LocalWorkload, durations: list[float]) -> tuple[list[Task], list[float]]:
    """Start the workers and publish the burst at the same moment; the tasks as sent, and their waits."""
    queue = workload.pool.metadata.name
    app.conf.broker_url = workload.broker_url
    start = time.time()
    workload.scale(WORKERS, {})
    sent = []
    with app.producer_or_acquire() as producer:
        for seconds in durations:
            now = time.time()
            work.apply_async((seconds, now, f"{queue}:waits"), queue=queue, producer=producer)
            sent.append(Task(now - start, seconds))
    client = redis.Redis.from_url(workload.broker_url)
    deadline = time.monotonic() + 120
    while client.llen(f"{queue}:waits") < len(durations) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sent, [float(line.split(b",")[0]) for line in client.lrange(f"{queue}:waits", 0, -1)]


def test_the_simulator_predicts_a_real_pools_waits_within_15_percent(workload: LocalWorkload) -> None:
    """Start-up is taken from this run (the first task's wait: when the fastest worker began to
    consume), since a loaded machine starts workers slower than the quiet one LOCAL_STARTUP_SECONDS
    was measured on; everything else is the model's."""
    rng = random.Random(7)
    sent, real = run_for_real(workload, [rng.uniform(0.5, 3.0) for _ in range(TASKS)])
    assert len(real) == TASKS, "every task ran"
    startup = min(real)
    model = PoolModel(concurrency=CONCURRENCY, startup_seconds=startup, queue=workload.pool.metadata.name)
    simulated = simulate(sent, model, FixedScaler(WORKERS), target_wait=10, horizon=0).waits
    print(f"start-up: measured {startup:.2f} s here, {LOCAL_STARTUP_SECONDS} s on a quiet machine")
    for pct in (50, 95):
        real_p, sim_p = percentile(real, pct), percentile(simulated, pct)
        print(f"p{pct}: real {real_p:.2f} s, simulated {sim_p:.2f} s")
        assert sim_p == pytest.approx(real_p, rel=0.15), f"p{pct}: simulated {sim_p:.2f} s, real {real_p:.2f} s"
