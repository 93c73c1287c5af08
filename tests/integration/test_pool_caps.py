"""Pool-wide caps with real `celery worker` processes on the test Redis, in local mode."""

from __future__ import annotations

import time

import pytest

from tests.integration.test_local_mode import send, step_until
from tests.support.local_pool import local_pool_run


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
