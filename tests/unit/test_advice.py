"""The advisor, finding by finding: what provokes it, the fix it names, and that it clears itself."""

from __future__ import annotations

from typing import Any

import pytest

from celery_worker_operator.advice import AdviceKind, PoolFacts, advise
from celery_worker_operator.brokers import QueueStats
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


@pytest.mark.parametrize(("facts", "kinds", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_finding(facts: PoolFacts, kinds: list[AdviceKind], fix: str) -> None:
    findings = advise(facts)
    assert [f.kind for f in findings] == kinds
    assert all(fix in f.fix for f in findings)


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
