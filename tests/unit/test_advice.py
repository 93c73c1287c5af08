"""The advisor, finding by finding: what provokes it, the fix it names, and that it clears itself."""

from __future__ import annotations

from typing import Any

import pytest

from celery_worker_operator.advice import AdviceKind, PoolFacts, advise, settle
from celery_worker_operator.brokers import QueueStats
from celery_worker_operator.control import WorkerStats
from celery_worker_operator.control.wire import worker_stats
from celery_worker_operator.metrics import PoolMetrics
from celery_worker_operator.reconciler import advice_condition
from celery_worker_operator.spec import CeleryWorkerPoolSpec
from celery_worker_operator.telemetry import PoolTelemetry, TaskStats, WorkerTelemetry

SPEC = CeleryWorkerPoolSpec.model_validate(
    {
        "broker": {"url": "redis://r/0"},
        "queues": ["q"],
        "worker": {"app": "a", "image": "i", "concurrency": 4, "prefetchMultiplier": 16},
    }
)


def workers(*active: int) -> dict[str, WorkerTelemetry]:
    return {
        f"p@w{n}": WorkerTelemetry(f"p@w{n}", True, busy, 0, 0.0, 2.0, True) for n, busy in enumerate(active, start=1)
    }


def telemetry(*active: int, **fields: Any) -> PoolTelemetry:
    defaults: dict[str, Any] = {
        "pool": "p",
        "observed_seconds": 60.0,
        "task_events": True,
        "busy_slots": sum(active),
        "live_workers": len(active),
        "workers": workers(*active),
        "tasks": {},
    }
    return PoolTelemetry(**{**defaults, **fields})


def queue(depth: int = 0, reserved: int | None = 0, consumers: int | None = None) -> dict[str, QueueStats]:
    return {"q": QueueStats("q", depth, reserved, consumers, 0.0)}


def tasks(**durations: tuple[float, float]) -> dict[str, TaskStats]:
    """Task name (underscores for dots) -> (mean, p95) run time, each with plenty of completions."""
    return {
        name.replace("_", "."): TaskStats(completed=20, service_time_mean=mean, service_time_p95=p95)
        for name, (mean, p95) in durations.items()
    }


HEALTHY = telemetry(4, 4, 3, tasks=tasks(app_a=(0.5, 0.9), app_b=(0.8, 1.5)))

# (case, facts, the kinds found, words the fix must hold)
CASES = [
    ("a healthy busy pool raises nothing", PoolFacts(SPEC, HEALTHY, queue(500, 11), 30.0), [], ""),
    ("nothing measured, nothing said", PoolFacts(SPEC, None, None, 30.0), [], ""),
    (
        "workers without -E",
        PoolFacts(SPEC, telemetry(2, task_events=False), queue(), 30.0),
        [AdviceKind.EVENTS_DISABLED],
        "worker.events: true",
    ),
    (
        "prefetch 16 with long tasks: 40 reserved on two busy workers, a third idle",
        PoolFacts(SPEC, telemetry(4, 4, 0), queue(0, 48), 30.0),
        [AdviceKind.PREFETCH_IMBALANCE],
        "worker.prefetchMultiplier: 1",
    ),
    (
        "a worker that just took the queue, its heartbeat still saying idle, is no imbalance",
        PoolFacts(SPEC, telemetry(0), queue(0, 12), 30.0),
        [],
        "",
    ),
    (
        "reserved = running (acks_late, prefetch 1) is no imbalance",
        PoolFacts(SPEC, telemetry(4, 4, 0), queue(0, 8), 30.0),
        [],
        "",
    ),
    (
        "a queue fills with no consumer while workers run",
        PoolFacts(SPEC, telemetry(1), queue(200, 0, consumers=0), 30.0),
        [AdviceKind.QUEUE_WITHOUT_CONSUMERS],
        "-Q must include q",
    ),
    (
        "long and short tasks in one pool",
        PoolFacts(SPEC, telemetry(1, tasks=tasks(app_short=(0.2, 0.3), app_report=(25.0, 28.0))), queue(), 60.0),
        [AdviceKind.MIXED_DURATIONS],
        "second CeleryWorkerPool with its own queue for app.report",
    ),
    (
        "a task longer than the grace period",
        PoolFacts(SPEC, telemetry(1, tasks=tasks(app_report=(40.0, 50.0))), queue(), 30.0),
        [AdviceKind.GRACE_TOO_SHORT],
        "worker.softShutdownSeconds: 50",
    ),
    (
        "adopted pools have no known grace period",
        PoolFacts(SPEC, telemetry(1, tasks=tasks(app_report=(40.0, 50.0))), queue(), None),
        [],
        "",
    ),
]


def test_the_condition_names_every_finding_and_clears_when_they_go() -> None:
    findings = advise(PoolFacts(SPEC, telemetry(4, 0, task_events=False), queue(0, 30), 30.0))
    status, reason, message = advice_condition(findings)
    assert (status, reason) == ("True", "EventsDisabled,PrefetchImbalance")
    assert "fix: worker.events: true" in message and "fix: worker.prefetchMultiplier: 1" in message
    assert advice_condition(advise(PoolFacts(SPEC, HEALTHY, queue(), 30.0)))[:2] == ("False", "NoFindings")


def test_the_advice_metric_is_one_per_finding_and_zero_for_the_rest() -> None:
    metrics = PoolMetrics()
    condition = {"type": "Advice", "status": "True", "reason": "PrefetchImbalance", "message": "m"}
    metrics.record_pass("ns", "p", {"conditions": [condition]}, None)
    value = metrics.registry.get_sample_value
    labels = {"namespace": "ns", "pool": "p"}
    assert value("celery_worker_operator_advice", {**labels, "kind": "PrefetchImbalance"}) == 1.0
    assert value("celery_worker_operator_advice", {**labels, "kind": "EventsDisabled"}) == 0.0


def stats(rss_mib: int = 60, processed: int = 0, prefetch: int = 4, visibility: float | None = None) -> WorkerStats:
    return WorkerStats(rss_mib * 1024, processed, prefetch, None, visibility)


MANAGED = SPEC.model_copy(update={"worker": SPEC.worker.model_copy(update={"prefetch_multiplier": 1})})  # type: ignore[union-attr]
LONG = telemetry(1, tasks=tasks(app_report=(7.5, 8.2)))

# The same, for findings from the workers' inspect stats and conf.
HEALTH_CASES = [
    (
        "a worker leaking 5 MiB per task with no recycling",
        PoolFacts(MANAGED, HEALTHY, queue(), 30.0, {"p@w1": stats(160, 20)}, {"p@w1": stats(60, 0)}),
        [AdviceKind.MEMORY_WITHOUT_RECYCLING],
        "worker.maxMemoryPerChild: 266240",
    ),
    (
        "warm-up growth over a few tasks is no leak",
        PoolFacts(MANAGED, HEALTHY, queue(), 30.0, {"p@w1": stats(160, 3)}, {"p@w1": stats(60, 0)}),
        [],
        "",
    ),
    (
        "a new worker has no baseline yet",
        PoolFacts(MANAGED, HEALTHY, queue(), 30.0, {"p@w2": stats(160, 20)}, {}),
        [],
        "",
    ),
    (
        "prefetch_count drifted above concurrency x multiplier on Redis",
        PoolFacts(MANAGED, HEALTHY, queue(), 30.0, {"p@w1": stats(prefetch=612)}),
        [AdviceKind.PREFETCH_DRIFT],
        "worker.extraArgs: worker_eta_task_limit=10",
    ),
    (
        "a worker_eta_task_limit the user set is what bounds it",
        PoolFacts(MANAGED, HEALTHY, queue(), 30.0, {"p@w1": WorkerStats(prefetch_count=10, eta_task_limit=10)}),
        [],
        "",
    ),
    (
        "visibility_timeout 5 s with 8 s tasks on Redis",
        PoolFacts(MANAGED, LONG, queue(), 30.0, {"p@w1": stats(visibility=5.0)}),
        [AdviceKind.VISIBILITY_TIMEOUT_TOO_SHORT],
        "broker.transportOptions.visibility_timeout: 17",
    ),
    (
        "the default hour is long enough for 8 s tasks",
        PoolFacts(MANAGED, LONG, queue(), 30.0, {"p@w1": stats()}),
        [],
        "",
    ),
    (
        "RabbitMQ has no visibility timeout",
        PoolFacts(MANAGED, LONG, queue(), 30.0, {"p@w1": stats(visibility=5.0)}, broker_url="amqp://r//"),
        [],
        "",
    ),
]


@pytest.mark.parametrize(
    ("facts", "kinds", "fix"), [c[1:] for c in CASES + HEALTH_CASES], ids=[c[0] for c in CASES + HEALTH_CASES]
)
def test_finding(facts: PoolFacts, kinds: list[AdviceKind], fix: str) -> None:
    findings = advise(facts)
    assert [f.kind for f in findings] == kinds
    assert all(fix in f.fix for f in findings)


def test_worker_stats_read_from_celery_replies() -> None:
    reply = {"rusage": {"maxrss": 53588}, "total": {"a.b": 3, "a.c": 2}, "prefetch_count": 2, "pid": 1}
    conf = {"broker_transport_options": {"visibility_timeout": 8}, "worker_eta_task_limit": 12}
    assert worker_stats(reply, conf) == WorkerStats(53588, 5, 2, 12, 8.0)
    assert worker_stats({"rusage": "N/A"}, None) == WorkerStats()


def test_a_flapping_finding_warns_once_and_clears_after_three_absent_passes() -> None:
    imbalanced = advise(PoolFacts(SPEC, telemetry(4, 0), queue(0, 30), 30.0))
    held, started = settle({}, imbalanced)
    assert [f.kind for f in started] == [AdviceKind.PREFETCH_IMBALANCE]
    for absent_or_back in ((), imbalanced, (), ()):  # flaps: absent, back, absent twice
        held, started = settle(held, absent_or_back)
        assert started == [] and AdviceKind.PREFETCH_IMBALANCE in held
    held, started = settle(held, ())
    assert held == {} and started == []
