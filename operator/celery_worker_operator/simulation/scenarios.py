"""The six bundled workloads the benchmark and `simulate --scenario` run. Pure and seeded.

Each is a trace shape Celery users meet, with a pool model and the autoscaling spec a user
would write for it (targets from the workload, workerStartupSeconds as the pool model starts
workers, everything else at its default).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..spec import AutoscalingSpec
from .baselines import FixedScaler, KedaScaler, OurScaler
from .engine import PoolModel, Result, Scaler, Task, burst, exponential, mixture, poisson_arrivals, simulate

HOUR = 3600.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    generate: Callable[[random.Random], list[Task]]
    pool: PoolModel
    autoscaling: AutoscalingSpec
    horizon: float

    def tasks(self, seed: int = 1) -> list[Task]:
        return self.generate(random.Random(seed))


def _steady(rng: random.Random) -> list[Task]:
    return poisson_arrivals(lambda t: 2.0, 2.0, HOUR, exponential(2.0), rng)


def _burst(rng: random.Random) -> list[Task]:
    tasks = poisson_arrivals(lambda t: 0.5, 0.5, 2 * HOUR, exponential(1.0), rng)
    for at in range(600, int(2 * HOUR), 1800):
        tasks += burst(float(at), 400, exponential(1.0), rng, spread=5.0)
    return tasks


def _diurnal(rng: random.Random) -> list[Task]:
    def rate(t: float) -> float:
        return 2.1 + 1.9 * math.sin(2 * math.pi * t / (2 * HOUR))

    return poisson_arrivals(rate, 4.0, 4 * HOUR, exponential(3.0), rng)


def _long(rng: random.Random) -> list[Task]:
    # The operations guide's example: 10 tasks a minute that each take 10 minutes.
    return poisson_arrivals(lambda t: 10 / 60, 10 / 60, 2 * HOUR, exponential(600.0, "report"), rng)


def _mixed(rng: random.Random) -> list[Task]:
    kinds = mixture((0.9, exponential(0.5, "thumbnail")), (0.1, exponential(60.0, "transcode")))
    return poisson_arrivals(lambda t: 3.0, 3.0, 2 * HOUR, kinds, rng)


def _herd(rng: random.Random) -> list[Task]:
    return burst(1200.0, 2000, exponential(2.0), rng, spread=10.0)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "steady",
            "Poisson 2/s, 2 s tasks (4 busy slots)",
            _steady,
            PoolModel(concurrency=4),
            AutoscalingSpec(
                min_replicas=1,
                max_replicas=10,
                target_wait_seconds=10,
                task_duration_seconds=2,
                worker_startup_seconds=10,
            ),
            HOUR,
        ),
        Scenario(
            "burst",
            "0.5/s of 1 s tasks, plus 400 tasks at once every 30 min",
            _burst,
            PoolModel(concurrency=4),
            AutoscalingSpec(
                min_replicas=1,
                max_replicas=20,
                target_wait_seconds=30,
                task_duration_seconds=1,
                worker_startup_seconds=10,
            ),
            2 * HOUR,
        ),
        Scenario(
            "diurnal",
            "0.2/s to 4/s and back every 2 h, 3 s tasks",
            _diurnal,
            PoolModel(concurrency=4),
            AutoscalingSpec(
                min_replicas=1,
                max_replicas=10,
                target_wait_seconds=15,
                task_duration_seconds=3,
                worker_startup_seconds=10,
            ),
            4 * HOUR,
        ),
        Scenario(
            "long",
            "10/min of 10 min tasks: 100 busy slots (the guide's example)",
            _long,
            PoolModel(concurrency=4, startup_seconds=30),
            AutoscalingSpec(
                min_replicas=1,
                max_replicas=40,
                target_wait_seconds=120,
                task_duration_seconds=600,
                worker_startup_seconds=30,
            ),
            2 * HOUR,
        ),
        Scenario(
            "mixed",
            "3/s: 90 % 0.5 s thumbnails, 10 % 60 s transcodes",
            _mixed,
            PoolModel(concurrency=8),
            AutoscalingSpec(
                min_replicas=1,
                max_replicas=10,
                target_wait_seconds=20,
                task_duration_seconds=6,
                worker_startup_seconds=10,
            ),
            2 * HOUR,
        ),
        Scenario(
            "herd",
            "idle at zero, then 2,000 tasks of 2 s within 10 s",
            _herd,
            PoolModel(concurrency=4),
            AutoscalingSpec(
                min_replicas=0,
                max_replicas=25,
                target_wait_seconds=60,
                task_duration_seconds=2,
                worker_startup_seconds=10,
            ),
            HOUR,
        ),
    )
}


FIXED_LIMIT = 10000  # maxReplicas' bound


def scalers_for(scenario: Scenario, names: list[str]) -> list[Scaler]:
    """Scalers by name: `ours`, `keda`, `keda-tuned`, `fixed:N`."""
    spec, pool = scenario.autoscaling, scenario.pool
    made: list[Scaler] = []
    for name in names:
        if name == "ours":
            made.append(OurScaler(spec, pool.concurrency))
        elif name == "keda":
            made.append(KedaScaler(spec.min_replicas, spec.max_replicas, target_per_replica=pool.concurrency))
        elif name == "keda-tuned":
            made.append(KedaScaler.tuned(spec.min_replicas, spec.max_replicas, target_per_replica=pool.concurrency))
        elif (fixed := re.fullmatch(r"fixed:([0-9]{1,5})", name)) and 1 <= int(fixed[1]) <= FIXED_LIMIT:
            made.append(FixedScaler(int(fixed[1])))
        elif name.startswith("fixed:"):
            raise ValueError(f"{name!r}: fixed:N takes 1 to {FIXED_LIMIT} workers (0 would never run a task)")
        else:
            raise ValueError(f"unknown policy {name!r}: use ours, keda, keda-tuned or fixed:N")
    return made


def run_scenario(scenario: Scenario, names: list[str], seed: int = 1) -> list[Result]:
    tasks = scenario.tasks(seed)
    return [
        simulate(tasks, scenario.pool, scaler, scenario.autoscaling.target_wait_seconds, scenario.horizon)
        for scaler in scalers_for(scenario, names)
    ]
