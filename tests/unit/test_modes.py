"""Who moves a pool's replicas: autoscaling.mode, the paused annotations and a disabled autoscaler
(policy.steering / policy.steer, pure), and what a pass does in each mode (the reconciler, over fakes
of our own adapters' protocols; the real ones are tested on the API server in tests/operator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.metrics import PoolMetrics
from celery_worker_operator.policy import DecisionKind, Mode, Steering, steer, steering
from celery_worker_operator.pool_loop import PoolLoop
from celery_worker_operator.reconciler import ControlReport, Reconciler, Sources
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads import WorkloadState
from tests.unit.test_metrics import samples
from tests.unit.test_reconciler import Clock, FakeProbe, FakeReporter, FakeTelemetry, FakeWorkload, condition

PAUSED = "celery-operator.dev/paused"
PINNED = "celery-operator.dev/paused-replicas"


def pool(
    annotations: dict[str, str] | None = None, replicas: int | None = None, **autoscaling: Any
) -> CeleryWorkerPool:
    spec: dict[str, Any] = {
        "broker": {"url": "redis://r/0"},
        "queues": ["q"],
        "worker": {"app": "a", "image": "i", "concurrency": 2},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "taskDurationSeconds": 1, **autoscaling},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": "p", "annotations": annotations or {}},
            "spec": spec,
        }
    )


@pytest.mark.parametrize(
    ("annotations", "replicas", "autoscaling", "expected"),
    [
        ({}, None, {}, Steering(Mode.AUTO)),
        ({}, None, {"mode": "recommend"}, Steering(Mode.RECOMMEND)),
        ({}, 3, {"enabled": False}, Steering(Mode.MANUAL, 3)),
        ({}, None, {"enabled": False}, Steering(Mode.MANUAL)),
        ({PAUSED: "true"}, None, {}, Steering(Mode.PAUSED)),
        ({PAUSED: "True"}, None, {"mode": "recommend"}, Steering(Mode.PAUSED)),  # pause wins over every mode
        ({PAUSED: "true", PINNED: "4"}, 2, {"enabled": False}, Steering(Mode.PAUSED, 4)),
        ({PAUSED: "true", PINNED: "0"}, None, {}, Steering(Mode.PAUSED, 0)),
        ({PAUSED: "false", PINNED: "4"}, None, {}, Steering(Mode.AUTO)),  # paused-replicas alone pauses nothing
        ({PINNED: "4"}, None, {}, Steering(Mode.AUTO)),
    ],
)
def test_steering_rule(
    annotations: dict[str, str], replicas: int | None, autoscaling: dict[str, Any], expected: Steering
) -> None:
    assert steering(pool(annotations, replicas, **autoscaling)) == expected


@pytest.mark.parametrize("value", ["-1", "three", "2.5", ""])
def test_a_paused_replicas_that_is_no_count_pauses_at_the_current_count_and_says_so(value: str) -> None:
    found = steering(pool({PAUSED: "true", PINNED: value}))
    assert (found.mode, found.replicas, found.scales, found.broadcasts) == (Mode.PAUSED, None, False, False)
    assert PINNED in found.problem and "held as they are" in found.problem


@pytest.mark.parametrize(
    ("steering_", "scales", "broadcasts"),
    [
        (Steering(Mode.AUTO), True, True),
        (Steering(Mode.MANUAL, 3), True, True),
        (Steering(Mode.RECOMMEND), False, False),
        (Steering(Mode.PAUSED), False, False),
        (Steering(Mode.PAUSED, 2), True, False),  # set to paused-replicas, limits still left alone
    ],
)
def test_what_each_mode_may_do(steering_: Steering, scales: bool, broadcasts: bool) -> None:
    assert (steering_.scales, steering_.broadcasts) == (scales, broadcasts)


def test_steer_pins_the_count_of_manual_and_paused_and_keeps_the_policys_otherwise() -> None:
    reporter, clock, workload = FakeReporter(), Clock(), FakeWorkload(replicas=2)
    decision = (
        Reconciler(reporter, None, clock)
        .reconcile(pool(), Sources(FakeProbe(depth=300), FakeTelemetry(), workload))
        .decision
    )
    assert decision is not None and decision.replicas == 5
    assert steer(decision, Steering(Mode.RECOMMEND)) is decision
    manual = steer(decision, Steering(Mode.MANUAL, 3))
    assert (manual.replicas, manual.kind) == (3, DecisionKind.DISABLED) and "spec.replicas is 3" in manual.reason
    held = steer(decision, Steering(Mode.PAUSED))
    assert (held.replicas, held.kind, held.reason.split(":")[0]) == (2, DecisionKind.PAUSED, "hold 2")
    pinned = steer(decision, Steering(Mode.PAUSED, 1))
    assert pinned.replicas == 1 and pinned.reason.startswith("scale down 2 -> 1: paused")
    assert pinned.recommendation == decision.recommendation, "the windows keep the policy's own recommendation"


class Passes:
    """Passes of one pool over fakes, with a limits step that counts its broadcasts."""

    def __init__(self, depth: int, replicas: int) -> None:
        self.probe, self.workload = FakeProbe(depth=depth), FakeWorkload(replicas=replicas)
        self.reporter, self.clock, self.broadcasts = FakeReporter(), Clock(), 0
        self.reconciler = Reconciler(self.reporter, None, self.clock)
        self.sources = Sources(self.probe, FakeTelemetry(), self.workload, self._limits)

    def _limits(self, pool: CeleryWorkerPool, expected: int, members: Sequence[str]) -> ControlReport:
        self.broadcasts += 1
        return ControlReport("True", "Applied", "ok")

    def run(self, pool: CeleryWorkerPool, passes: int = 1) -> dict[str, Any]:
        for _ in range(passes):
            self.clock.now += 1
            self.reconciler.reconcile(pool, self.sources)
        return self.reporter.statuses[-1]

    def reasons(self) -> list[str]:
        return [reason for _, reason, _ in self.reporter.events]


def test_recommend_mode_reports_what_it_would_do_and_never_scales_nor_broadcasts() -> None:
    passes = Passes(depth=300, replicas=2)
    status = passes.run(pool(mode="recommend"), passes=3)
    assert passes.workload.scaled == [] and passes.broadcasts == 0
    assert (status["desiredReplicas"], status["replicas"], status["mode"]) == (5, 2, "Recommend")
    assert passes.reasons() == ["WouldScaleUp"], "one Event per new recommendation, not one per pass"
    assert passes.reporter.events[0][2].startswith("would scale up 2 -> 5: ")
    assert condition(status, "LimitsApplied")["status"] == "Unknown"
    assert (condition(status, "Paused")["status"], condition(status, "Paused")["reason"]) == ("False", "Recommend")
    passes.probe.depth = 0
    passes.run(pool(mode="recommend"), passes=15)  # past the down window: it would go back to 1
    downs = [message for _, reason, message in passes.reporter.events if reason == "WouldScaleDown"]
    assert passes.reasons()[0] == "WouldScaleUp" and downs and passes.workload.scaled == []
    assert downs[0].startswith("would scale down 5 -> "), "from what it recommended before, not from the current 2"
    assert downs[-1].split(":")[0].endswith("-> 1")


def test_the_pause_annotation_holds_replicas_and_limits_until_it_is_removed() -> None:
    passes = Passes(depth=300, replicas=2)
    status = passes.run(pool({PAUSED: "true"}), passes=3)
    assert passes.workload.scaled == [] and passes.broadcasts == 0 and passes.reasons() == []
    paused = condition(status, "Paused")
    assert (paused["status"], paused["reason"], status["mode"]) == ("True", "PausedByAnnotation", "Paused")
    assert status["desiredReplicas"] == 2
    status = passes.run(pool())
    assert passes.workload.scaled[0][0] == 5 and passes.broadcasts == 1 and status["mode"] == "Auto"
    assert condition(status, "Paused")["status"] == "False"


def test_paused_replicas_sets_the_count_once_and_holds_it() -> None:
    passes = Passes(depth=300, replicas=4)
    passes.run(pool({PAUSED: "true", PINNED: "1"}), passes=4)
    assert [replicas for replicas, _ in passes.workload.scaled] == [1] and passes.broadcasts == 0
    assert passes.reasons() == ["ScaledDown"] and "paused-replicas is 1" in passes.reporter.events[0][2]


def test_with_autoscaling_disabled_spec_replicas_is_applied_on_every_change() -> None:
    passes = Passes(depth=300, replicas=1)
    passes.run(pool(replicas=3, enabled=False), passes=2)
    passes.run(pool(replicas=2, enabled=False))
    status = passes.run(pool(enabled=False))  # no spec.replicas: left as they are
    assert [replicas for replicas, _ in passes.workload.scaled] == [3, 2] and passes.broadcasts == 4
    assert status["mode"] == "Manual" and status["lastDecision"]["kind"] == "Disabled"


class DeclaredWorkload(FakeWorkload):
    """A Deployment whose replica count another manager applies (a GitOps manifest with replicas)."""

    declared_by: tuple[str, ...] = ("argocd-controller",)

    def observe(self) -> WorkloadState:
        state = super().observe()
        return WorkloadState(state.replicas, state.ready_replicas, concurrency=2, replicas_declared_by=self.declared_by)


def test_replicas_another_manager_applies_are_left_alone_with_a_condition_and_one_warning() -> None:
    passes = Passes(depth=300, replicas=2)
    workload = DeclaredWorkload(replicas=2)
    passes.sources = Sources(passes.probe, FakeTelemetry(), workload)
    status = passes.run(pool(), passes=3)
    able = condition(status, "AbleToScale")
    assert (able["status"], able["reason"]) == ("False", "FieldConflict") and "argocd-controller" in able["message"]
    assert workload.scaled == [] and passes.reasons() == ["FieldConflict"]
    workload.declared_by = ()  # the manifest no longer sets replicas
    status = passes.run(pool())
    assert condition(status, "AbleToScale")["status"] == "True" and workload.scaled[0][0] == 5


@pytest.mark.parametrize(
    ("annotations", "autoscaling", "wakes", "counted"),
    [
        ({}, {}, True, 1.0),
        ({}, {"mode": "recommend"}, False, None),  # recommended, not carried out: no scale counted
        ({PAUSED: "true"}, {}, False, None),
    ],
)
def test_only_a_pool_that_scales_itself_wakes_early_and_counts_scales(
    annotations: dict[str, str], autoscaling: dict[str, Any], wakes: bool, counted: float | None
) -> None:
    passes, metrics = Passes(depth=0, replicas=1), PoolMetrics()
    loop = PoolLoop("default", "p", passes.reporter, lambda pool: passes.sources, metrics, clock=passes.clock)
    loop.step(pool(annotations, **autoscaling))  # at its floor: the between-polls check is armed, or not
    assert (loop.wake is not None) == wakes
    passes.probe.depth = 300
    passes.clock.now += 1
    loop.step(pool(annotations, **autoscaling))
    scales = [v for (name, _), v in samples(metrics).items() if name == "celery_worker_operator_scale_decisions_total"]
    assert (sum(scales) if scales else None) == counted
