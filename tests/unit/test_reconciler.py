"""The reconciler's and the pool loop's own rules, with fakes of our adapters' protocols (the real
ones are tested on real brokers, workers and the API server elsewhere): writes only on change, one
Event per scale, one Warning per blocked spell, holding when blind, resuming from status."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery_worker_operator.brokers import BrokerUnavailable, QueueStats
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.metrics import PoolMetrics
from celery_worker_operator.pool_loop import PoolLoop
from celery_worker_operator.reconciler import ControlReport, PassResult, PoolMemory, Reconciler, Sources
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.telemetry import PoolTelemetry
from celery_worker_operator.workloads import WorkloadMissing, WorkloadState


def pool(**autoscaling: Any) -> CeleryWorkerPool:
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": "p"},
            "spec": {
                "broker": {"url": "redis://r/0"},
                "queues": ["q"],
                "worker": {"app": "a", "image": "i", "concurrency": 2},
                "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "taskDurationSeconds": 1, **autoscaling},
            },
        }
    )


@dataclass
class FakeProbe:
    depth: int = 0
    down: bool = False

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        if self.down:
            raise BrokerUnavailable("redis://:secret@r/0", "connection refused", ["secret"])
        return {q: QueueStats(q, self.depth, 0, None, 0.0) for q in queues}

    def close(self) -> None:
        pass


@dataclass
class FakeTelemetry:
    task_events: bool = True

    def snapshot(self, pool: str, queues: Sequence[str] = (), claim: Collection[str] = ()) -> PoolTelemetry:
        return PoolTelemetry(
            pool=pool,
            observed_seconds=60.0,
            task_events=self.task_events,
            busy_slots=0,
            live_workers=0,
            workers={},
            tasks={},
        )


@dataclass
class FakeWorkload:
    replicas: int = 1
    missing: bool = False
    crash_loop: str | None = None
    scaled: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    down: int = 0  # replicas not ready (a crashed worker waiting for its restart)

    def observe(self) -> WorkloadState:
        if self.missing:
            raise WorkloadMissing("Deployment default/p not found")
        return WorkloadState(self.replicas, self.replicas - self.down, concurrency=2, crash_loop=self.crash_loop)

    def scale(self, replicas: int, load: Mapping[str, int]) -> None:
        self.scaled.append((replicas, dict(load)))
        self.replicas = replicas


@dataclass
class FakeReporter:
    events: list[tuple[str, str, str]] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))

    def status(self, status: dict[str, Any]) -> None:
        self.statuses.append(status)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pass:
    """One pool's passes over fakes, as the pool loop runs them."""

    reconciler: Reconciler
    sources: Sources

    def reconcile(self, pool: CeleryWorkerPool) -> PassResult:
        return self.reconciler.reconcile(pool, self.sources)


def reconciler(
    probe: FakeProbe, workload: FakeWorkload, memory: PoolMemory | None = None
) -> tuple[Pass, FakeReporter, Clock]:
    reporter, clock = FakeReporter(), Clock()
    return Pass(Reconciler(reporter, memory, clock), Sources(probe, FakeTelemetry(), workload)), reporter, clock


def test_a_scale_is_one_event_with_its_reason_and_status_is_written_only_on_change() -> None:
    probe, workload = FakeProbe(depth=300), FakeWorkload(replicas=1)
    rec, reporter, clock = reconciler(probe, workload)
    rec.reconcile(pool())
    assert workload.scaled[0][0] == 5  # 300 waiting x 1 s / 30 s = 10 slots, 2 per worker
    assert [(t, r) for t, r, _ in reporter.events] == [("Normal", "ScaledUp")]
    assert "300 waiting" in reporter.events[0][2]
    probe.depth = 0
    workload.scaled.clear()
    for _ in range(3):  # nothing changes inside the down window: no scale, no event, no new status
        clock.now += 1
        rec.reconcile(pool())
    writes = len(reporter.statuses)
    clock.now += 1
    rec.reconcile(pool())
    assert len(reporter.statuses) == writes and len(reporter.events) == 1 and workload.scaled == []


def test_max_concurrent_tasks_says_once_when_it_starts_binding() -> None:
    probe, workload = FakeProbe(depth=300), FakeWorkload(replicas=1)
    rec, reporter, clock = reconciler(probe, workload)
    for _ in range(3):
        rec.reconcile(pool(maxConcurrentTasks=6))
        clock.now += 1
    assert workload.replicas == 3  # 6 tasks / concurrency 2
    capped = [message for _, reason, message in reporter.events if reason == "TooManyTasks"]
    assert len(capped) == 1 and "maxConcurrentTasks 6 / concurrency 2 caps at 3" in capped[0]
    probe.depth = 0
    rec.reconcile(pool(maxConcurrentTasks=6))
    probe.depth = 300
    rec.reconcile(pool(maxConcurrentTasks=6))
    assert [reason for _, reason, _ in reporter.events].count("TooManyTasks") == 2, "a new episode is told again"


def test_advice_is_one_warning_when_it_starts_a_condition_while_it_holds_and_never_moves_replicas() -> None:
    probe, workload, telemetry = FakeProbe(depth=0), FakeWorkload(replicas=2), FakeTelemetry(task_events=False)
    reporter, clock = FakeReporter(), Clock()
    rec = Reconciler(reporter, None, clock)
    sources = Sources(probe, telemetry, workload)
    quiet = rec.reconcile(pool(minReplicas=2), sources)
    for _ in range(2):
        clock.now += 1
        rec.reconcile(pool(minReplicas=2), sources)
    assert [r for _, r, _ in reporter.events] == ["EventsDisabled"] and workload.scaled == []
    advice = {c["type"]: c for c in rec.memory.last_status["conditions"]}["Advice"]  # type: ignore[index]
    assert advice["status"] == "True" and "worker.events: true" in advice["message"]
    assert quiet.decision is not None and quiet.decision.replicas == 2
    telemetry.task_events = True
    for _ in range(3):  # gone for three passes in a row: cleared
        clock.now += 1
        rec.reconcile(pool(minReplicas=2), sources)
    advice = {c["type"]: c for c in rec.memory.last_status["conditions"]}["Advice"]  # type: ignore[index]
    assert (advice["status"], advice["reason"]) == ("False", "NoFindings")


def test_pool_rates_split_over_the_new_count_at_once_and_over_fewer_workers_only_after_the_down_window() -> None:
    probe, workload = FakeProbe(depth=300), FakeWorkload(replicas=1)
    told: list[int] = []

    def limits(pool: CeleryWorkerPool, expected: int, members: Sequence[str]) -> ControlReport:
        told.append(expected)
        return ControlReport("True", "Applied", "ok")

    reporter, clock = FakeReporter(), Clock()
    rec = Reconciler(reporter, None, clock)
    sources = Sources(probe, FakeTelemetry(), workload, limits)
    sized = pool(minReplicas=1, maxReplicas=5, scaleDown={"stabilizationSeconds": 10})
    rec.reconcile(sized, sources)  # scales up 1 -> 5
    workload.down = 1  # one of five crashed and waits for its restart
    for _ in range(2):
        clock.now += 6
        rec.reconcile(sized, sources)
    assert told == [5, 5, 4], "the others' shares rise once four held for the 10 s down window"


def test_blind_passes_hold_replicas_and_say_why_without_the_password() -> None:
    probe, workload = FakeProbe(down=True), FakeWorkload(replicas=3)
    rec, reporter, _ = reconciler(probe, workload)
    decision = rec.reconcile(pool()).decision
    assert decision is not None and decision.replicas == 3 and workload.scaled == []
    condition = next(c for c in reporter.statuses[-1]["conditions"] if c["type"] == "MetricsAvailable")
    assert (condition["status"], condition["reason"]) == ("False", "BrokerUnavailable")
    assert "secret" not in str(reporter.statuses)


def test_a_missing_workload_is_one_warning_however_many_passes() -> None:
    reporter, clock, workload = FakeReporter(), Clock(), FakeWorkload(missing=True)
    sources = Sources(FakeProbe(), FakeTelemetry(), workload)
    loop = PoolLoop("default", "p", reporter, lambda pool: sources, PoolMetrics(), clock=clock)
    for _ in range(5):
        clock.now += 10
        assert loop.step(pool()).decision is None
    assert [(t, r) for t, r, _ in reporter.events] == [("Warning", "WorkloadMissing")]
    ready = next(c for c in reporter.statuses[-1]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WorkloadMissing")


def test_a_resumed_pool_holds_its_last_desired_count_for_a_down_window() -> None:
    status = {"desiredReplicas": 6, "replicas": 6, "conditions": []}
    rec, _, clock = reconciler(FakeProbe(depth=0), FakeWorkload(replicas=6), PoolMemory.resume(status, 1_000_000.0))
    spec = pool(scaleDown={"stabilizationSeconds": 30})
    assert rec.reconcile(spec).decision.replicas == 6  # type: ignore[union-attr]
    clock.now += 31
    assert rec.reconcile(spec).decision.replicas < 6  # type: ignore[union-attr]


def test_a_spec_past_the_schema_is_one_warning_and_a_slow_retry() -> None:
    """An old CRD or a webhook-less edit can store what the models refuse: the pool says why, nothing is sized."""
    reporter, clock, workload = FakeReporter(), Clock(), FakeWorkload()
    sources = Sources(FakeProbe(), FakeTelemetry(), workload)
    loop = PoolLoop("default", "p", reporter, lambda pool: sources, PoolMetrics(), clock=clock)
    body = pool(minReplicas=5).model_dump(by_alias=True, exclude_none=True)
    body["spec"]["autoscaling"]["maxReplicas"] = 2
    body["metadata"]["generation"] = 7
    for _ in range(3):
        assert loop.step(body).blocked == "InvalidSpec"
    assert [(t, r) for t, r, _ in reporter.events] == [("Warning", "InvalidSpec")]
    ready = next(c for c in reporter.statuses[-1]["conditions"] if c["type"] == "Ready")
    assert "spec.autoscaling.maxReplicas" in ready["message"] and ready["observedGeneration"] == 7
    assert loop.interval == 30 and workload.scaled == []


def test_workers_that_keep_exiting_turn_workers_running_false_with_what_they_said() -> None:
    workload = FakeWorkload(replicas=1)
    rec, reporter, _ = reconciler(FakeProbe(depth=0), workload)
    rec.reconcile(pool())
    assert condition(reporter.statuses[-1], "WorkersRunning")["status"] == "True"
    workload.crash_loop = (
        "worker p-1 exited with 2 (2 in a row; next start in 20 s): Unable to load celery application."
    )
    rec.reconcile(pool())
    crashing = condition(reporter.statuses[-1], "WorkersRunning")
    assert (crashing["status"], crashing["reason"]) == ("False", "CrashLoopBackOff")
    assert "Unable to load celery application" in crashing["message"]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)
