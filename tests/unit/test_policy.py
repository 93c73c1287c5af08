"""The capacity policy, rule by rule, as tables of cases (the HPA replica calculator's style)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_worker_operator.policy import (
    Decision,
    DecisionKind,
    Limit,
    Observation,
    QueueObservation,
    Recommendation,
    Terms,
    decide,
    remember,
    wakes_early,
)
from celery_worker_operator.spec import AutoscalingSpec, ScaleDown, ScaleUp

NOW = 1000.0


def observe(
    depth: int | None = 0,
    reserved: int = 0,
    current: int = 1,
    age: float = 0.0,
    oldest: float | None = None,
    **fields: Any,
) -> Observation:
    """An observation at NOW whose broker numbers were measured `age` seconds ago; the oldest
    waiting task has waited `oldest` seconds (None: unknown)."""
    return Observation(
        time=NOW,
        current_replicas=current,
        queues=(QueueObservation("q", depth, reserved, oldest),),
        measured_at=NOW - age,
        **fields,
    )


def scaling(**fields: Any) -> AutoscalingSpec:
    return AutoscalingSpec(**{"min_replicas": 0, "max_replicas": 100, **fields})


def past(*replicas: int, ago: float = 10.0) -> tuple[Recommendation, ...]:
    return tuple(Recommendation(NOW - ago, r) for r in replicas)


# (case, observation, spec, concurrency, history, expected replicas, words the reason must hold)
CASES = [
    (
        "drain: with the oldest task's age unknown, the backlog drains within the target: 30 x 1 s / 10 s",
        observe(depth=30, current=1, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0),
        scaling(target_wait_seconds=10),
        1,
        (),
        3,
        "30 waiting -> 3 slots",
    ),
    (
        "drain: what the oldest task waited is gone from its target: 30 x 1 s / (10 - 4) s = 5 slots",
        observe(depth=30, current=1, oldest=4.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0),
        scaling(target_wait_seconds=10),
        1,
        (),
        5,
        "30 waiting (oldest 4s) within 6s",
    ),
    (
        "drain: a task long past its target still leaves half the target: 30 x 1 s / 5 s = 6 slots",
        observe(depth=30, current=1, oldest=40.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0),
        scaling(target_wait_seconds=10),
        1,
        (),
        6,
        "(oldest 40s) within 5s",
    ),
    (
        "start-up: a pool that must grow drains within the target less the oldest's wait and the new workers' "
        "start-up: 8 busy + 60 x 1 s / (10 - 2 - 3) s = 20 slots",
        observe(depth=60, current=2, oldest=2.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=8),
        scaling(target_wait_seconds=10, worker_startup_seconds=3),
        4,
        (),
        5,
        "60 waiting (oldest 2s) within 5s (new workers start in 3s, workerStartupSeconds) -> 20 slots",
    ),
    (
        "start-up: without workerStartupSeconds new workers count at once: 8 + 60 / 8 = 15.5 slots",
        observe(depth=60, current=2, oldest=2.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=8),
        scaling(target_wait_seconds=10),
        4,
        (),
        4,
        "60 waiting (oldest 2s) within 8s -> 15.5 slots",
    ),
    (
        "start-up: with the oldest's wait unknown only the start-up comes off: 30 x 1 s / (10 - 4) s = 5",
        observe(depth=30, current=1, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0),
        scaling(target_wait_seconds=10, worker_startup_seconds=4),
        1,
        (),
        5,
        "30 waiting within 6s (new workers start in 4s, workerStartupSeconds)",
    ),
    (
        "start-up: a backlog the pool drains as it is needs no new worker, so no start-up comes off",
        observe(depth=8, current=3, oldest=1.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=8),
        scaling(target_wait_seconds=10, worker_startup_seconds=3),
        4,
        (),
        3,
        "8 waiting (oldest 1s) within 9s -> 8.89 slots",
    ),
    (
        "start-up: unset, the pool's measured start-up comes off: 8 busy + 60 x 1 s / (10 - 2 - 3) s = 20 slots",
        observe(depth=60, current=2, oldest=2.0, service_time_mean=1.0, busy_slots=8, worker_startup=3.0),
        scaling(target_wait_seconds=10),
        4,
        (),
        5,
        "60 waiting (oldest 2s) within 5s (new workers start in 3s, measured) -> 20 slots",
    ),
    (
        "start-up: an explicit workerStartupSeconds wins over the measured one: 8 + 60 / (10 - 2 - 1) = 16.6",
        observe(depth=60, current=2, oldest=2.0, service_time_mean=1.0, busy_slots=8, worker_startup=3.0),
        scaling(target_wait_seconds=10, worker_startup_seconds=1),
        4,
        (),
        5,
        "within 7s (new workers start in 1s, workerStartupSeconds) -> 16.6 slots",
    ),
    (
        "start-up: workerStartupSeconds 0 wins too: new workers count at once, as without any start-up",
        observe(depth=60, current=2, oldest=2.0, service_time_mean=1.0, busy_slots=8, worker_startup=3.0),
        scaling(target_wait_seconds=10, worker_startup_seconds=0),
        4,
        (),
        4,
        "60 waiting (oldest 2s) within 8s -> 15.5 slots",
    ),
    (
        "start-up: workers slower to start than the target still leave half of it: 60 x 1 s / 5 s = 12",
        observe(depth=60, current=1, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0),
        scaling(target_wait_seconds=10, worker_startup_seconds=30),
        4,
        (),
        3,
        "60 waiting within 5s (new workers start in 30s, workerStartupSeconds)",
    ),
    (
        "guide: 10/min of 10 min tasks = 100 busy slots = 25 workers of 4",
        observe(current=25, arrival_rate=10 / 60, service_time_mean=600.0, busy_slots=100),
        scaling(target_utilization=1.0),
        4,
        (),
        25,
        "hold 25",
    ),
    (
        "utilization headroom: 100 / 0.8 = 125 slots = 32 workers",
        observe(current=20, arrival_rate=10 / 60, service_time_mean=600.0, busy_slots=80),
        scaling(),
        4,
        (),
        32,
        "scale up 20 -> 32",
    ),
    (
        "backlog drains within the target wait: 100 x 3 s / 30 s = 10 slots",
        observe(depth=90, reserved=10, current=5, arrival_rate=0.0, service_time_mean=3.0, busy_slots=0),
        scaling(target_wait_seconds=30),
        2,
        (),
        5,
        "100 waiting",
    ),
    (
        "taskDurationSeconds stands in for an unmeasured service time",
        observe(depth=40, current=1, arrival_rate=0.0, busy_slots=0),
        scaling(target_wait_seconds=10, task_duration_seconds=5.0),
        4,
        (),
        5,
        "taskDurationSeconds",
    ),
    (
        "no duration at all: size by queue length and say so",
        observe(depth=30, current=1, busy_slots=2),
        scaling(target_utilization=1.0),
        4,
        (),
        8,
        "no task duration known",
    ),
    (
        "clamped to maxReplicas",
        observe(depth=10_000, current=3, service_time_mean=10.0),
        scaling(max_replicas=7),
        1,
        (),
        7,
        "scale up 3 -> 7",
    ),
    (
        "clamped to minReplicas",
        observe(depth=0, current=3, busy_slots=0),
        scaling(min_replicas=2),
        4,
        (),
        2,
        "scale down 3 -> 2",
    ),
    (
        "tolerance band: 5.3 replicas' worth of work keeps 5",
        observe(current=5, arrival_rate=1.0, service_time_mean=21.2, busy_slots=0),
        scaling(target_utilization=1.0),
        4,
        (),
        5,
        "hold 5",
    ),
    (
        "step up: at most max(4 pods, 100 % of 2) per poll",
        observe(depth=1000, current=2, service_time_mean=10.0),
        scaling(scale_up=ScaleUp(max_step_pods=4, max_step_percent=100)),
        1,
        (),
        6,
        "step limit",
    ),
    (
        "step down: at most max(5 pods, 50 % of 20) per poll while busy slots are unknown",
        observe(current=20, service_time_mean=1.0),
        scaling(min_replicas=1, scale_down=ScaleDown(stabilization_seconds=0)),
        4,
        (),
        10,
        "scale down 20 -> 10",
    ),
    (
        "workers measured idle with nothing waiting all go in one step: 80 slots, 4 busy",
        observe(current=20, busy_slots=4, service_time_mean=1.0),
        scaling(min_replicas=1, scale_down=ScaleDown(stabilization_seconds=0)),
        4,
        (),
        1,
        "scale down 20 -> 1",
    ),
    (
        "with a task waiting, idle slots are not trusted: the step limit holds",
        observe(depth=1, current=20, busy_slots=4, service_time_mean=1.0),
        scaling(min_replicas=1, scale_down=ScaleDown(stabilization_seconds=0)),
        4,
        (),
        10,
        "step limit",
    ),
    (
        "a served burst lingers in the minute rate, not the recent one: 2/s x 1.75 s / 0.8 = 4.4 slots",
        observe(current=6, arrival_rate=6.0, arrival_rate_recent=2.0, service_time_mean=1.75, busy_slots=3),
        scaling(scale_down=ScaleDown(stabilization_seconds=0)),
        4,
        (),
        2,
        "2/s (recent)",
    ),
    (
        "a rising rate is sized at the minute rate; what that misses waits, and the backlog term drains it",
        observe(depth=10, current=2, arrival_rate=2.0, arrival_rate_recent=6.0, service_time_mean=1.75, busy_slots=8),
        scaling(target_wait_seconds=10),
        4,
        (),
        3,
        "2/s (window)",
    ),
    (
        "busy slots floor the steady term without headroom: 10 busy of 12 holds 3 workers",
        observe(current=3, arrival_rate=0.0, service_time_mean=1.0, busy_slots=10),
        scaling(),
        4,
        (),
        3,
        "hold 3",
    ),
    (
        "down window: the highest recent recommendation wins",
        observe(current=8, busy_slots=0, service_time_mean=1.0),
        scaling(min_replicas=1, scale_down=ScaleDown(stabilization_seconds=60)),
        4,
        past(8, 6),
        8,
        "stabilization window keeps 8",
    ),
    (
        "up window: the lowest recent recommendation bounds growth",
        observe(depth=1000, current=3, service_time_mean=10.0),
        scaling(scale_up=ScaleUp(stabilization_seconds=60)),
        1,
        past(3),
        3,
        "stabilization window keeps 3",
    ),
    (
        "from zero: one waiting task starts a worker at once, windows or not",
        observe(depth=1, current=0),
        scaling(scale_up=ScaleUp(stabilization_seconds=300)),
        4,
        past(0, 0),
        1,
        "scale up 0 -> 1",
    ),
    (
        "not to zero while a task runs",
        observe(depth=0, current=1, busy_slots=1, service_time_mean=1.0),
        scaling(),
        4,
        (),
        1,
        "hold 1",
    ),
    (
        "not to zero while busy slots are unknown",
        observe(depth=0, current=1, service_time_mean=1.0),
        scaling(),
        4,
        (),
        1,
        "hold 1",
    ),
    (
        "not to zero before the down window has been empty throughout",
        observe(depth=0, current=1, busy_slots=0, arrival_rate=0.0, service_time_mean=1.0),
        scaling(scale_down=ScaleDown(stabilization_seconds=10)),
        4,
        past(1, ago=5),
        1,
        "stabilization window keeps 1",
    ),
    (
        "to zero after an idle down window",
        observe(depth=0, current=1, busy_slots=0, arrival_rate=0.0, service_time_mean=1.0),
        scaling(),
        4,
        past(0, ago=5) + past(1, ago=11),
        0,
        "scale down 1 -> 0",
    ),
    (
        "missing broker numbers never shrink",
        observe(depth=None, current=5),
        scaling(),
        4,
        (),
        5,
        "broker numbers missing",
    ),
    (
        "stale broker numbers never shrink",
        observe(depth=0, current=5, age=31.0),
        scaling(poll_seconds=10),
        4,
        (),
        5,
        "stale",
    ),
    (
        "blind pools go up to fallbackReplicas",
        observe(depth=None, current=2),
        scaling(fallback_replicas=7),
        4,
        (),
        7,
        "fallbackReplicas 7",
    ),
    ("but never down to it", observe(depth=None, current=9), scaling(fallback_replicas=7), 4, (), 9, "holding 9"),
    (
        "maxReplicas binds even when blind",
        observe(depth=None, current=9),
        scaling(max_replicas=6),
        4,
        (),
        6,
        "holding 6",
    ),
    (
        "maxConcurrentTasks 12 at concurrency 4 caps a large backlog at 3 replicas",
        observe(depth=5000, current=1, arrival_rate=0.0, service_time_mean=2.0, busy_slots=4),
        scaling(max_concurrent_tasks=12),
        4,
        (),
        3,
        "maxConcurrentTasks 12 / concurrency 4 caps at 3",
    ),
    (
        "maxConcurrentTasks rounds down: 13 slots at concurrency 4 are 3 replicas",
        observe(depth=5000, current=3, arrival_rate=0.0, service_time_mean=2.0, busy_slots=12),
        scaling(max_concurrent_tasks=13),
        4,
        (),
        3,
        "caps at 3",
    ),
    (
        "maxConcurrentTasks wins over minReplicas",
        observe(depth=0, current=5, busy_slots=0, arrival_rate=0.0, service_time_mean=1.0),
        scaling(min_replicas=5, max_concurrent_tasks=8),
        4,
        (),
        2,
        "scale down 5 -> 2",
    ),
    (
        "maxConcurrentTasks binds a blind pool too",
        observe(depth=None, current=6),
        scaling(max_concurrent_tasks=16),
        4,
        (),
        4,
        "holding 4",
    ),
    (
        "maxConcurrentTasks above maxReplicas x concurrency leaves maxReplicas to bind",
        observe(depth=5000, current=1, arrival_rate=0.0, service_time_mean=2.0, busy_slots=4),
        scaling(max_replicas=5, max_concurrent_tasks=1000),
        4,
        (),
        5,
        "scale up 1 -> 5",
    ),
    (
        "disabled autoscaling leaves replicas alone",
        observe(depth=500, current=3),
        scaling(enabled=False),
        4,
        (),
        3,
        "disabled",
    ),
]


@pytest.mark.parametrize(
    ("obs", "spec", "concurrency", "history", "expected", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_policy_rule(
    obs: Observation,
    spec: AutoscalingSpec,
    concurrency: int,
    history: tuple[Recommendation, ...],
    expected: int,
    reason: str,
) -> None:
    decision = decide(obs, spec, concurrency, history)
    assert decision.replicas == expected, decision.reason
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("cap", "concurrency", "limit"),
    [(12, 4, Limit.TOO_MANY_TASKS), (400, 4, Limit.TOO_MANY), (None, 4, Limit.TOO_MANY)],
)
def test_the_limit_names_which_ceiling_bound(cap: int | None, concurrency: int, limit: Limit) -> None:
    obs = observe(depth=5000, current=1, arrival_rate=0.0, service_time_mean=2.0, busy_slots=4)
    assert decide(obs, scaling(max_replicas=10, max_concurrent_tasks=cap), concurrency).limit == limit


def test_guide_example_terms_show_the_working() -> None:
    obs = observe(current=0, arrival_rate=10 / 60, service_time_mean=600.0, busy_slots=0)
    terms = decide(obs, scaling(target_utilization=1.0), 4).terms
    assert terms.offered_load == pytest.approx(100.0)
    assert terms.slots == pytest.approx(100.0)
    assert terms.recommendation == 25
    assert terms.service_time_source == "measured"


def test_terms_name_the_rate_and_the_idle_workers() -> None:
    obs = observe(current=6, arrival_rate=6.0, arrival_rate_recent=2.0, service_time_mean=1.75, busy_slots=3)
    terms = decide(obs, scaling(), 4).terms
    assert (terms.arrival_rate, terms.rate_source) == (2.0, "recent")
    assert terms.offered_load == pytest.approx(3.5)
    assert terms.idle_workers == (24 - 3) // 4


def last_pass(replicas: int, seen: int = 0, limit: Limit = Limit.WITHIN_RANGE, concurrency: int | None = 4) -> Decision:
    """The decision of the last pass: `replicas` for a pool of `concurrency` slots each, `seen` waiting."""
    terms = Terms(replicas, replicas, replicas, backlog=seen, concurrency=concurrency)
    return Decision(replicas, DecisionKind.HOLD, limit, "", replicas, terms)


# (case, ready messages now, the last pass, spec, wakes)
WAKE_CASES = [
    ("at zero, one ready message wakes the loop", 1, last_pass(0), scaling(), True),
    ("at zero, nothing waits: sleep on", 0, last_pass(0), scaling(), False),
    ("at minReplicas 1, more ready than 4 slots wakes it", 5, last_pass(1), scaling(min_replicas=1), True),
    ("as many ready as slots: prefetch may take them", 4, last_pass(1), scaling(min_replicas=1), False),
    ("a spike on a pool above its floor wakes it: 9 ready > 8 slots", 9, last_pass(2), scaling(), True),
    ("half a burst seen: 51 ready > the 35 the last pass sized for", 51, last_pass(3, seen=35), scaling(), True),
    ("a backlog that only drains waits for the poll", 30, last_pass(3, seen=35), scaling(), False),
    ("held back by the step limit: steps are per poll", 90, last_pass(3, 35, Limit.UP_STEP), scaling(), False),
    ("held back by the up window: it is per poll", 90, last_pass(3, 35, Limit.UP_STABILIZED), scaling(), False),
    ("at maxReplicas there is nowhere to grow", 50, last_pass(1), scaling(min_replicas=1, max_replicas=1), False),
    ("at maxConcurrentTasks' ceiling neither", 50, last_pass(2), scaling(max_concurrent_tasks=8), False),
    ("a blind pass (no concurrency known) waits for its poll", 50, last_pass(1, concurrency=None), scaling(), False),
    ("autoscaling off never wakes", 50, last_pass(0), scaling(enabled=False), False),
]


@pytest.mark.parametrize(
    ("waiting", "last", "spec", "wakes"), [c[1:] for c in WAKE_CASES], ids=[c[0] for c in WAKE_CASES]
)
def test_wake_rule(waiting: int, last: Decision, spec: AutoscalingSpec, wakes: bool) -> None:
    assert wakes_early(waiting, last, spec) is wakes


def test_terms_carry_the_drain_horizon() -> None:
    obs = observe(depth=30, current=1, oldest=4.0, arrival_rate=0.0, service_time_mean=1.0, busy_slots=0)
    terms = decide(obs, scaling(target_wait_seconds=10), 1).terms
    assert (terms.oldest_wait, terms.drain_seconds, terms.backlog_slots) == (4.0, 6.0, pytest.approx(5.0))


def test_terms_carry_the_start_up_only_when_the_pool_grows() -> None:
    spec = scaling(target_wait_seconds=10, worker_startup_seconds=3)
    grows = decide(observe(depth=60, current=2, oldest=2.0, service_time_mean=1.0, busy_slots=8), spec, 4).terms
    holds = decide(observe(depth=8, current=3, oldest=1.0, service_time_mean=1.0, busy_slots=8), spec, 4).terms
    assert (grows.startup, grows.startup_source, grows.drain_seconds) == (3, "workerStartupSeconds", 5.0)
    assert (holds.startup, holds.startup_source, holds.drain_seconds) == (None, None, 9.0)


@pytest.mark.parametrize(
    ("setting", "measured", "startup", "source"),
    [
        (None, None, None, None),
        (None, 2.5, 2.5, "measured"),
        (4.0, 2.5, 4.0, "workerStartupSeconds"),
        (0.0, 2.5, None, "workerStartupSeconds"),
    ],
    ids=["neither: 0", "measured when unset", "the setting wins", "a setting of 0 wins too"],
)
def test_the_start_up_term_names_its_source(
    setting: float | None, measured: float | None, startup: float | None, source: str | None
) -> None:
    obs = observe(depth=60, current=2, oldest=2.0, service_time_mean=1.0, busy_slots=8, worker_startup=measured)
    terms = decide(obs, scaling(target_wait_seconds=10, worker_startup_seconds=setting), 4).terms
    assert (terms.startup, terms.startup_source) == (startup, source)


def test_remember_keeps_only_the_windows() -> None:
    spec = scaling(scale_down=ScaleDown(stabilization_seconds=60))
    history = past(4, ago=100) + past(5, ago=30)
    decision = decide(observe(current=5, busy_slots=0, service_time_mean=1.0), spec, 4, history)
    kept = remember(history, decision, NOW, spec)
    assert [r.replicas for r in kept] == [5, decision.recommendation]


bounds = st.integers(min_value=0, max_value=50).flatmap(
    lambda low: st.tuples(st.just(low), st.integers(min_value=max(low, 1), max_value=60))
)
maybe_depth = st.one_of(st.none(), st.integers(min_value=0, max_value=100_000))
maybe_time = st.one_of(st.none(), st.floats(min_value=0.001, max_value=7200))


@given(
    bounds=bounds,
    depth=maybe_depth,
    current=st.integers(min_value=0, max_value=80),
    service=maybe_time,
    arrival=st.one_of(st.none(), st.floats(min_value=0, max_value=1000)),
    busy=st.one_of(st.none(), st.integers(min_value=0, max_value=500)),
    concurrency=st.integers(min_value=1, max_value=64),
    history=st.lists(st.integers(min_value=0, max_value=80), max_size=6),
    cap=st.one_of(st.none(), st.integers(min_value=64, max_value=2000)),
)
def test_replicas_always_within_bounds_and_never_shrink_blind(
    bounds: tuple[int, int],
    depth: int | None,
    current: int,
    service: float | None,
    arrival: float | None,
    busy: int | None,
    concurrency: int,
    history: list[int],
    cap: int | None,
) -> None:
    low, high = bounds
    spec = scaling(min_replicas=low, max_replicas=high, max_concurrent_tasks=cap)
    obs = observe(depth=depth, current=current, service_time_mean=service, arrival_rate=arrival, busy_slots=busy)
    decision = decide(obs, spec, concurrency, past(*history))
    ceiling = high if cap is None else min(high, cap // concurrency)
    assert decision.replicas <= ceiling
    assert decision.replicas * concurrency <= (cap or decision.replicas * concurrency)
    assert decision.replicas >= min(low, ceiling)
    if depth is None:
        assert decision.replicas >= min(current, ceiling)
