"""The simulator against queueing theory, and the behaviours the benchmark depends on."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from celery_worker_operator.policy import Observation, QueueObservation
from celery_worker_operator.simulation.baselines import FixedScaler, KedaScaler, OurScaler
from celery_worker_operator.simulation.engine import (
    PoolModel,
    Task,
    exponential,
    oracle_worker_seconds,
    parse_trace,
    poisson_arrivals,
    simulate,
    union_length,
)
from celery_worker_operator.simulation.scenarios import SCENARIOS, run_scenario
from celery_worker_operator.spec import AutoscalingSpec


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue (Erlang's C formula)."""
    top = offered**servers / math.factorial(servers) * servers / (servers - offered)
    bottom = sum(offered**k / math.factorial(k) for k in range(servers)) + top
    return top / bottom


@pytest.mark.parametrize(("workers", "concurrency", "rate"), [(1, 4, 3.0), (4, 1, 3.0), (2, 4, 6.5)])
def test_fixed_pool_matches_mmc(workers: int, concurrency: int, rate: float) -> None:
    """Poisson arrivals, exponential 1 s tasks, c = workers x concurrency slots: Erlang C holds."""
    servers, horizon = workers * concurrency, 40_000 / rate
    tasks = poisson_arrivals(lambda t: rate, rate, horizon, exponential(1.0), random.Random(7))
    result = simulate(tasks, PoolModel(concurrency, startup_seconds=0), FixedScaler(workers), 1e9, horizon)
    waits = result.waits[len(result.waits) // 10 :]  # drop the warm-up
    p_wait = erlang_c(servers, rate)
    assert sum(w > 0 for w in waits) / len(waits) == pytest.approx(p_wait, abs=0.03)
    assert statistics.fmean(waits) == pytest.approx(p_wait / (servers - rate), rel=0.15)


def test_prefetch_holds_tasks_on_a_busy_worker() -> None:
    """A worker with concurrency 1 and multiplier 4 keeps 3 tasks reserved while a second worker idles."""
    tasks = [Task(0.0, 100.0), Task(0.1, 1.0), Task(0.2, 1.0), Task(0.3, 1.0)]
    scaler = FixedScaler(1)
    pool = PoolModel(concurrency=1, startup_seconds=0, prefetch_multiplier=4)
    result = simulate(tasks, pool, scaler, 10.0, 200.0)
    assert result.waits[1:] == pytest.approx([99.9, 100.8, 101.7])
    assert result.samples[1].depth == 3  # the poll at 60 s counts the 3 reserved tasks as waiting


def test_youngest_pod_removal_kills_busy_workers_and_idle_only_does_not() -> None:
    results = {r.scaler: r for r in run_scenario(SCENARIOS["long"], ["ours", "keda"])}
    assert results["keda"].killed_tasks > 0
    assert results["ours"].killed_tasks == 0


def test_a_burst_between_polls_is_seen_at_the_next_look_not_the_next_poll() -> None:
    """Ours looks at the queue every half second between its 60 s polls; KEDA waits for its poll."""
    steady = [Task(float(t), 1.0) for t in range(0, 120)]
    spike = [Task(30.0 + i / 100, 1.0) for i in range(400)]
    spec = AutoscalingSpec(min_replicas=1, max_replicas=10, target_wait_seconds=10, poll_seconds=60)
    pool = PoolModel(concurrency=4, startup_seconds=2)
    ours = simulate(steady + spike, pool, OurScaler(spec, 4), 10.0, 120.0)
    keda = simulate(steady + spike, pool, KedaScaler(1, 10, 4, poll_seconds=60), 10.0, 120.0)
    assert ours.early_polls >= 1
    assert next(at for at, replicas in ours.timeline if replicas > 1) <= 31.0
    assert next(at for at, replicas in keda.timeline if replicas > 1) == 60.0
    assert ours.p95 < keda.p95


def test_keda_ignores_reserved_messages() -> None:
    """KEDA's list length counts ready messages only: prefetched ones do not scale it up."""
    keda = KedaScaler(min_replicas=1, max_replicas=10, target_per_replica=1)
    obs = Observation(time=0.0, current_replicas=1, queues=(QueueObservation("q", 0, 50),), measured_at=0.0)
    assert keda.desired(obs) == 1


@pytest.mark.parametrize(("scaler", "after_a_minute"), [(KedaScaler.tuned(1, 10, 4), 1), (KedaScaler(1, 10, 4), 10)])
def test_keda_shrinks_to_the_highest_recommendation_of_its_down_window(scaler: KedaScaler, after_a_minute: int) -> None:
    """Tuned: a 60 s window lets 10 replicas go a minute after the queue emptied; defaults hold 300 s."""

    def seen(at: float, depth: int, current: int) -> Observation:
        return Observation(time=at, current_replicas=current, queues=(QueueObservation("q", depth),), measured_at=at)

    assert scaler.desired(seen(0.0, 40, 1)) == 5  # grows by max(4 pods, 100 %) per sync
    assert scaler.desired(seen(30.0, 0, 10)) == 10
    assert scaler.desired(seen(61.0, 0, 10)) == after_a_minute


def test_union_length_merges_overlaps() -> None:
    assert union_length([(0, 10), (5, 12), (20, 21), (20.5, 20.7)]) == pytest.approx(13.0)


def test_oracle_packs_running_tasks_and_keeps_the_floor() -> None:
    tasks = [Task(0.0, 10.0), Task(0.0, 10.0), Task(5.0, 10.0)]
    # 0-5: 2 running -> 1 worker of 2; 5-10: 3 -> 2; 10-15: 1 -> 1; 15-20: 0 -> floor 1
    assert oracle_worker_seconds(tasks, PoolModel(concurrency=2), min_replicas=1, end=20.0) == pytest.approx(25.0)


def test_trace_csv_is_shifted_to_zero_and_checked() -> None:
    tasks = parse_trace(["timestamp,task,duration", "1700000010,a,2.5", "1700000000,b,1"])
    assert sorted((t.arrival, t.name, t.duration) for t in tasks) == [(0.0, "b", 1.0), (10.0, "a", 2.5)]
    with pytest.raises(ValueError, match="line 1"):
        parse_trace(["10,a,-1"])


def test_scenarios_are_deterministic() -> None:
    first, second = (run_scenario(SCENARIOS["burst"], ["ours"], seed=3)[0] for _ in range(2))
    assert first.waits == second.waits and first.worker_seconds == second.worker_seconds
