"""Our policy against the KEDA-style baseline and the oracle, on the six bundled scenarios.

    .venv/bin/python benchmarks/policy.py [--seed N]

Everything is simulated in this one run (the baseline is measured here, not remembered), so the
ratios are exact for the seed. Targets (issue 3): our p95 wait <= target on all six; >= 30 % fewer
seconds over target than KEDA at <= its worker-seconds on >= 5 of 6; <= 1.25x the oracle's cost.
"""

from __future__ import annotations

import argparse

from celery_worker_operator.simulation.baselines import FixedScaler
from celery_worker_operator.simulation.engine import oracle_worker_seconds, simulate
from celery_worker_operator.simulation.scenarios import SCENARIOS, run_scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    seed = parser.parse_args().seed
    print(
        f"{'scenario':9} {'target':>6} {'p95 ours':>8} {'p95 keda':>8} {'p95 limit':>9} "
        f"{'over ours':>9} {'over keda':>9} {'cost/keda':>9} {'cost/oracle':>11} {'keda/oracle':>11} {'killed o/k':>10}"
    )
    wins = 0
    for scenario in SCENARIOS.values():
        ours, keda = run_scenario(scenario, ["ours", "keda"], seed)
        tasks = scenario.tasks(seed)
        target = scenario.autoscaling.target_wait_seconds
        # The physical limit: every allowed worker ready from the start. No policy waits less.
        limit = simulate(tasks, scenario.pool, FixedScaler(scenario.autoscaling.max_replicas), target, scenario.horizon)
        oracle = oracle_worker_seconds(tasks, scenario.pool, scenario.autoscaling.min_replicas, ours.end)
        fewer_violations = ours.seconds_over_target <= 0.7 * keda.seconds_over_target or (
            keda.seconds_over_target == ours.seconds_over_target == 0
        )
        wins += fewer_violations and ours.worker_seconds <= keda.worker_seconds
        print(
            f"{scenario.name:9} {target:6.0f} {ours.p95:8.1f} {keda.p95:8.1f} {limit.p95:9.1f} "
            f"{ours.seconds_over_target:9.0f} {keda.seconds_over_target:9.0f} "
            f"{ours.worker_seconds / keda.worker_seconds:9.2f} {ours.worker_seconds / oracle:11.2f} "
            f"{keda.worker_seconds / oracle:11.2f} {ours.killed_tasks:>4}/{keda.killed_tasks:<5}"
        )
    print(f"\nscenarios with >= 30% fewer seconds over target at <= KEDA's cost: {wins} of {len(SCENARIOS)}")


if __name__ == "__main__":
    main()
