"""Local mode end to end: real Redis, real `celery worker` processes, real events and probes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from celery_worker_operator.advice import AdviceKind
from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.reconciler import member_load
from tests.support.local_app import app, record
from tests.support.local_pool import local_pool_run, step_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_run(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalRun]:
    with local_pool_run(redis_url, monkeypatch, "lm", concurrency=4, max_replicas=4, scale_down_seconds=3) as run:
        yield run


def send(run: LocalRun, count: int, seconds: float) -> None:
    name = run.pool.metadata.name
    app.conf.broker_url = os.environ["CELERY_BROKER_URL"]
    with app.producer_or_acquire() as producer:
        for number in range(count):
            record.apply_async((name, number, seconds), queue=name, producer=producer)


def ran(run: LocalRun, which: str) -> Counter[int]:
    client = redis.Redis.from_url(run.broker_url)
    return Counter(int(n) for n in client.lrange(f"{run.pool.metadata.name}:{which}", 0, -1))


def test_burst_scales_up_runs_every_task_once_and_returns_to_minimum(local_run: LocalRun) -> None:
    local_run.step()
    assert local_run.workload.observe().replicas == 0
    send(local_run, 200, 0.5)
    passes = step_until(local_run, lambda: local_run.workload.observe().replicas > 0, timeout=10)
    assert passes <= 2, "a pool at zero must wake within two polls of a backlog"
    step_until(local_run, lambda: sum(ran(local_run, "ended").values()) == 200, timeout=90)
    started, ended = ran(local_run, "started"), ran(local_run, "ended")
    assert set(ended) == set(range(200)) and max(ended.values()) == 1, "every task completes exactly once"
    assert started == ended, "no task started twice or left without an end"
    step_until(local_run, lambda: local_run.workload.observe().replicas == 0, timeout=40)
    assert local_run.reporter.scale_events >= 2
    assert ran(local_run, "started") == ran(local_run, "ended"), "scale-down interrupted a running task"
    advised = [reason for _, _, reason, _ in local_run.reporter.events if reason in {k.value for k in AdviceKind}]
    assert advised == [], "a healthy pool under a burst raised advice"


@contextmanager
def looping_every_minute(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, prefix: str, max_replicas: int, scale_down_seconds: float
) -> Iterator[LocalRun]:
    """A pool polled every 60 s with its loop on its own thread, as `local` runs it: the test's
    thread only watches, so anything sooner than a minute is the loop's look between polls."""
    with local_pool_run(
        redis_url, monkeypatch, prefix, concurrency=2, max_replicas=max_replicas,
        scale_down_seconds=scale_down_seconds, poll_seconds=60,
    ) as run:  # fmt: skip
        stop = threading.Event()
        loop = threading.Thread(target=run.run, args=(stop,), daemon=True)
        loop.start()
        try:
            wait_for(lambda: bool(run.reporter.status_now), 20)
            yield run
        finally:
            stop.set()
            loop.join(timeout=10)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def scale_ups(run: LocalRun) -> list[float]:
    return [at for at, _, reason, _ in run.reporter.events if reason == "ScaledUp"]


def test_a_burst_at_zero_wakes_the_loop_long_before_the_next_poll(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with looping_every_minute(redis_url, monkeypatch, "wake", max_replicas=2, scale_down_seconds=0) as run:
        assert run.reporter.status_now.get("replicas") == 0, "the first pass leaves the pool at zero"
        sent = time.time()
        send(run, 3, 0.1)
        assert wait_for(lambda: bool(scale_ups(run)), 15)
        assert scale_ups(run)[0] - sent < 5, "a burst at zero must not wait out the 60 s poll"
        assert wait_for(lambda: sum(ran(run, "ended").values()) == 3, 40)


def test_a_spike_on_a_running_pool_wakes_the_loop_long_before_the_next_poll(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above its floor too: one worker busy with a long task, then 30 short ones land at once."""
    with looping_every_minute(redis_url, monkeypatch, "spike", max_replicas=3, scale_down_seconds=60) as run:
        send(run, 1, 20.0)
        assert wait_for(lambda: sum(ran(run, "started").values()) == 1, 30), "one worker runs the long task"
        assert len(scale_ups(run)) == 1 and run.workload.observe().replicas == 1
        sent = time.time()
        send(run, 30, 0.5)
        assert wait_for(lambda: len(scale_ups(run)) == 2, 15)
        assert scale_ups(run)[1] - sent < 5, "a spike on a running pool must not wait out the 60 s poll"
        assert run.workload.observe().replicas > 1
        assert wait_for(lambda: sum(ran(run, "ended").values()) == 31, 60)


def test_new_workers_start_up_is_measured_and_sizes_the_next_scale_up(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workerStartupSeconds unset: the first worker's start-up (process start to its first event) is
    measured, shown, and comes off the drain horizon of the next scale-up."""
    with local_pool_run(
        redis_url, monkeypatch, "startup", concurrency=2, max_replicas=6, scale_down_seconds=120
    ) as run:  # fmt: skip
        run.step()
        assert run.reporter.status_now["replicas"] == 0 and "workerStartupSeconds" not in run.reporter.status_now
        send(run, 2, 0.2)
        step_until(run, lambda: "workerStartupSeconds" in run.reporter.status_now, timeout=30, every=0.5)
        measured = run.loop.memory.startup.median
        print(f"measured start-up: {run.loop.memory.startup.samples} s")
        assert measured is not None and 0.2 < measured < 30, "a local worker starts in seconds"
        assert run.reporter.status_now["workerStartupSeconds"] == pytest.approx(measured, rel=0.05)
        labels = {"namespace": "default", "pool": run.pool.metadata.name}
        gauge = run.metrics.registry.get_sample_value("celery_worker_operator_pool_worker_startup_seconds", labels)
        assert gauge == pytest.approx(measured, rel=0.05)
        send(run, 60, 0.5)
        deadline = time.monotonic() + 20
        while (decision := run.step().decision) is None or decision.replicas <= decision.terms.current:
            assert time.monotonic() < deadline, f"no scale-up on a backlog of 60; last {decision}"
            time.sleep(0.5)
        assert (decision.terms.startup, decision.terms.startup_source) == (measured, "measured"), decision.reason
        assert f"new workers start in {measured:.3g}s, measured" in decision.reason
        print(f"next scale-up: {decision.reason}")
        assert wait_for(lambda: sum(ran(run, "ended").values()) == 62, 60)


def test_killed_worker_is_replaced_and_its_tasks_redelivered(local_run: LocalRun) -> None:
    send(local_run, 12, 4.0)

    def busiest() -> str | None:
        load = member_load(local_run.telemetry())
        return max(load, key=load.__getitem__) if load and max(load.values()) > 0 else None

    step_until(local_run, lambda: busiest() is not None, timeout=30)
    victim = busiest() or ""
    os.killpg(local_run.workload.pid(victim), signal.SIGKILL)
    step_until(local_run, lambda: victim not in local_run.workload.observe().members, timeout=10)
    assert any(reason == "WorkerExited" for _, _, reason, _ in local_run.reporter.events)
    step_until(local_run, lambda: set(ran(local_run, "ended")) == set(range(12)), timeout=90)
    assert max(ran(local_run, "started").values()) == 2, "the killed worker's tasks ran again elsewhere"


def test_a_misspelled_app_is_reported_in_celerys_words_and_restarts_back_off(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with local_pool_run(
        redis_url, monkeypatch, "typo", concurrency=1, max_replicas=1, scale_down_seconds=3,
        app="cwo_typo_app", min_replicas=1,
    ) as run:  # fmt: skip

        def exits() -> list[tuple[float, str]]:
            return [(at, message) for at, _, reason, message in run.reporter.events if reason == "WorkerExited"]

        step_until(run, lambda: len(exits()) >= 3, timeout=120)
        status = run.reporter.status_now
    (first, said), (second, _), (third, _) = exits()[:3]
    assert "Unable to load celery application" in said, said
    assert second - first >= 10 and third - second >= 20, "restarts wait 10 s, then 20 s, as the kubelet's back-off"
    crashing = next(c for c in status["conditions"] if c["type"] == "WorkersRunning")
    assert (crashing["status"], crashing["reason"]) == ("False", "CrashLoopBackOff")
    assert "Unable to load celery application" in crashing["message"]
