"""Pool-wide caps with real `celery worker` processes on the test Redis, in local mode."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.spec import CeleryWorkerPool
from tests.integration.test_local_mode import send
from tests.support.local_pool import local_pool_run, step_until
from tests.support.task_app import publisher, stamp


def test_max_concurrent_tasks_never_lets_a_large_backlog_grow_past_the_cap(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = {"autoscaling": {"maxConcurrentTasks": 12}}
    with local_pool_run(
        redis_url, monkeypatch, "cap", concurrency=4, max_replicas=10, scale_down_seconds=30, spec=cap
    ) as run:
        send(run, 600, 0.5)  # 600 x 0.5 s / 5 s target wait = 60 slots: 15 workers without the cap
        step_until(run, lambda: run.workload.observe().replicas > 0, timeout=10)
        most_replicas, most_online = 0, 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            run.step()
            most_replicas = max(most_replicas, run.workload.observe().replicas)
            most_online = max(most_online, run.telemetry().live_workers)
            time.sleep(1.0)
        assert most_replicas == 3, f"12 tasks at concurrency 4 allow 3 workers, saw {most_replicas}"
        assert most_online <= 3, f"{most_online} workers were heard at once"
        assert run.reporter.status_now["lastDecision"]["limit"] == "TooManyTasks"
        told = [message for _, _, reason, message in run.reporter.events if reason == "TooManyTasks"]
        assert len(told) == 1 and "maxConcurrentTasks 12 / concurrency 4 caps at 3" in told[0]


POOL_RATE = 60  # per minute, for the whole pool
WINDOW = 60.0  # seconds measured at each size: a minute, as the rate is stated


def sized(pool: CeleryWorkerPool, replicas: int) -> CeleryWorkerPool:
    """The pool held at `replicas` (min = max), as a user would pin it to change its size."""
    scaling = pool.spec.autoscaling.model_copy(update={"min_replicas": replicas, "max_replicas": replicas})
    return pool.model_copy(update={"spec": pool.spec.model_copy(update={"autoscaling": scaling})})


def completions(run: LocalRun, start: float, end: float) -> int:
    stamps = redis.Redis.from_url(run.broker_url).lrange(f"{run.pool.metadata.name}:done", 0, -1)
    return sum(start <= float(at) < end for at in stamps)


def shares_in_force(run: LocalRun) -> str:
    conditions = {c["type"]: c for c in run.reporter.status_now.get("conditions", [])}
    return str(conditions.get("LimitsApplied", {}).get("message", ""))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pool_rate_holds_for_the_whole_pool_at_every_size_through_a_killed_worker(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {
        "worker": {"app": "tests.support.task_app:app"},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 6},
        "limits": {"poolRateLimits": {"tasks.stamp": f"{POOL_RATE}/m"}},
    }
    with local_pool_run(
        redis_url, monkeypatch, "prl", concurrency=2, max_replicas=6, scale_down_seconds=30, spec=spec
    ) as run:
        name = run.pool.metadata.name
        with publisher(redis_url) as client, client.producer_or_acquire() as producer:
            for _ in range(400):  # more than 3 minutes at 60/m: the queue never runs dry
                client.send_task(stamp.name, (name,), queue=name, producer=producer)
        measured: dict[int, int] = {}
        victim: str | None = None  # the one worker killed, a third into the 6-worker minute
        for replicas in (1, 3, 6):
            run.pool = sized(run.pool, replicas)
            share = f"{POOL_RATE // replicas}/m x {replicas}"
            step_until(
                run,
                lambda replicas=replicas, share=share: (
                    run.workload.observe().replicas == replicas and share in shares_in_force(run)
                ),
                timeout=40,
            )
            start = time.time()
            while time.time() < start + WINDOW:
                if replicas == 6 and time.time() > start + WINDOW / 3 and victim is None:
                    victim = run.workload.observe().members[0]
                    os.killpg(run.workload.pid(victim), signal.SIGKILL)
                run.step()
                time.sleep(1.0)
            measured[replicas] = completions(run, start, start + WINDOW)
        print(f"completions per minute by pool size: {measured}")  # shown with -s, for the record
        exits = [message for _, _, reason, message in run.reporter.events if reason == "WorkerExited"]
        assert len(exits) == 1 and str(victim) in exits[0], exits
        for replicas, count in measured.items():
            assert abs(count - POOL_RATE) <= POOL_RATE * 0.1, f"{count}/min at {replicas} workers: {measured}"
