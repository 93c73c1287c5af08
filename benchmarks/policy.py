"""Our policy against KEDA-style baselines (tuned and default), the oracle and the best fixed pool.

    .venv/bin/python benchmarks/policy.py [--seed N]

Everything is simulated in this one run (the baselines are measured here, not remembered), so the
ratios are exact for the seed. Targets (issue 15): our p95 wait <= target wherever the physical
limit allows it; worker-seconds / oracle worst case <= 1.6 and mean <= 1.4; >= 30 % fewer seconds
over target than KEDA-tuned at <= its cost on >= 5 of 6. The oracle packs busy slots into
fractional workers with no start-up, so the real floor is above it: the cheapest fixed pool that
meets the target is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics

from celery_worker_operator.simulation.baselines import FixedScaler
from celery_worker_operator.simulation.engine import Result, Task, oracle_worker_seconds, simulate
from celery_worker_operator.simulation.scenarios import SCENARIOS, Scenario, run_scenario

POLICIES = ["ours", "keda-tuned", "keda"]


def best_fixed_pool(scenario: Scenario, tasks: list[Task]) -> Result | None:
    """The smallest fixed pool whose p95 wait meets the target (waits fall as the pool grows)."""
    target = scenario.autoscaling.target_wait_seconds
    low, high = max(scenario.autoscaling.min_replicas, 1), scenario.autoscaling.max_replicas
    best = None
    while low <= high:
        size = (low + high) // 2
        result = simulate(tasks, scenario.pool, FixedScaler(size), target, scenario.horizon)
        if result.p95 <= target:
            best, high = result, size - 1
        else:
            low = size + 1
    return best


def beats(ours: Result, baseline: Result) -> bool:
    """>= 30 % fewer seconds over target (or none for both) at no more worker-seconds."""
    fewer = ours.seconds_over_target <= 0.7 * baseline.seconds_over_target or (
        baseline.seconds_over_target == ours.seconds_over_target == 0
    )
    return fewer and ours.worker_seconds <= baseline.worker_seconds


def ratio(ours: float, baseline: float) -> str:
    return f"{ours / baseline:.2f}" if baseline else ("1.00" if ours == 0 else "inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    seed = parser.parse_args().seed
    print(
        f"{'scenario':9} {'target':>6} {'p95 limit':>9} {'p95 ours/tuned/keda':>21} "
        f"{'s over ours/tuned/keda':>24} {'cost/oracle ours/tuned/keda':>28} "
        f"{'over o/t':>8} {'cost o/t':>8} {'best fixed':>14} {'killed o/t/k':>12}"
    )
    wins_tuned = wins_default = 0
    ours_vs_oracle = []
    for scenario in SCENARIOS.values():
        ours, tuned, keda = run_scenario(scenario, POLICIES, seed)
        tasks = scenario.tasks(seed)
        target = scenario.autoscaling.target_wait_seconds
        # The physical limit: every allowed worker ready from the start. No policy waits less.
        limit = simulate(tasks, scenario.pool, FixedScaler(scenario.autoscaling.max_replicas), target, scenario.horizon)
        oracle = oracle_worker_seconds(tasks, scenario.pool, scenario.autoscaling.min_replicas, ours.end)
        fixed = best_fixed_pool(scenario, tasks)
        wins_tuned += beats(ours, tuned)
        wins_default += beats(ours, keda)
        ours_vs_oracle.append(ours.worker_seconds / oracle)
        runs = (ours, tuned, keda)
        fixed_text = f"{fixed.scaler[6:]} ({fixed.worker_seconds / oracle:.2f})" if fixed else "none"
        print(
            f"{scenario.name:9} {target:6.0f} {limit.p95:9.1f} {'/'.join(f'{r.p95:.1f}' for r in runs):>21} "
            f"{'/'.join(f'{r.seconds_over_target:.1f}' for r in runs):>24} "
            f"{'/'.join(f'{r.worker_seconds / oracle:.2f}' for r in runs):>28} "
            f"{ratio(ours.seconds_over_target, tuned.seconds_over_target):>8} "
            f"{ours.worker_seconds / tuned.worker_seconds:8.2f} {fixed_text:>14} "
            f"{'/'.join(str(r.killed_tasks) for r in runs):>12}"
        )
    print(
        f"\nours / oracle: worst {max(ours_vs_oracle):.2f}, mean {statistics.fmean(ours_vs_oracle):.2f}"
        f"\nscenarios with >= 30% fewer seconds over target at <= the baseline's cost: "
        f"{wins_tuned} of {len(SCENARIOS)} vs KEDA-tuned, {wins_default} of {len(SCENARIOS)} vs KEDA defaults"
        "\n(best fixed: the smallest fixed pool meeting the target, with its cost / oracle)"
    )


if __name__ == "__main__":
    main()
