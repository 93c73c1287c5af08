"""Rate limits, time limits and queue routing kept applied to every worker of a pool.

Celery applies `rate_limit`, `time_limit`, `add_consumer` and `cancel_consumer` in a worker's
memory only; a worker that starts later has none of it. `PoolController.converge` compares each
worker of a pool with the spec every poll and sends only the difference, to that pool's workers.
`plan.py` decides (pure), `wire.py` reads Celery's replies (pure), `controller.py` talks to the broker.
Time limits are enforced by Celery only from a worker's start: start workers with
`worker_start_settings(settings)` as trailing `key=value` arguments.
"""

from .controller import ConvergeResult, PoolController
from .plan import (
    Command,
    Condition,
    Defaults,
    Outcome,
    PoolSettings,
    TimeLimits,
    WorkerSettings,
    WorkerStats,
    describe_shares,
    limits_condition,
    plan_convergence,
    share_rates,
    split_rate,
    validate,
    worker_start_settings,
)

__all__ = [
    "Command",
    "Condition",
    "ConvergeResult",
    "Defaults",
    "Outcome",
    "PoolController",
    "PoolSettings",
    "TimeLimits",
    "WorkerSettings",
    "WorkerStats",
    "describe_shares",
    "limits_condition",
    "plan_convergence",
    "share_rates",
    "split_rate",
    "validate",
    "worker_start_settings",
]
