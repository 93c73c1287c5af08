"""PURE: the operations guide's pitfalls, found in a pool's own numbers, each with a concrete fix.

The guide (reference/celery-monitoring-operations.md, "Best Practices" and "Common Pitfalls") lists
mistakes nobody detects for the user; this module reads them from what one pass measured anyway
(task events, the broker probe, the spec) and says which spec field to set to what. A finding holds
only while its cause is measured now, so it clears itself; none of them ever changes a decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .brokers.base import QueueStats
from .spec import CeleryWorkerPoolSpec
from .telemetry.model import PoolTelemetry

MIXED_RATIO = 10.0  # the longest task type runs this many times the shortest: the guide's "route long and short apart"
MIXED_MIN_SECONDS = 1.0  # ... and takes at least this long, so sub-second noise is no finding
MIXED_MIN_COMPLETED = 5  # completions per task type in the window before its duration counts


class AdviceKind(StrEnum):
    """One pitfall of the operations guide; the `Advice` condition, Events and metrics name these."""

    EVENTS_DISABLED = "EventsDisabled"
    PREFETCH_IMBALANCE = "PrefetchImbalance"
    QUEUE_WITHOUT_CONSUMERS = "QueueWithoutConsumers"
    MIXED_DURATIONS = "MixedDurations"
    GRACE_TOO_SHORT = "GraceTooShort"


@dataclass(frozen=True)
class Finding:
    """What was seen, and the fix: a spec field and its value."""

    kind: AdviceKind
    seen: str
    fix: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.seen}; fix: {self.fix}"


@dataclass(frozen=True)
class PoolFacts:
    """One pass's measurements as the advisor reads them; None where something was not measured."""

    spec: CeleryWorkerPoolSpec
    telemetry: PoolTelemetry | None
    queues: Mapping[str, QueueStats] | None
    grace_seconds: float | None  # what a stopping worker gets before SIGKILL (managed pools)


def advise(facts: PoolFacts) -> tuple[Finding, ...]:
    """Every finding that holds now, in a fixed order."""
    checks = (_events_disabled, _prefetch_imbalance, _queue_without_consumers, _mixed_durations, _grace_too_short)
    return tuple(finding for check in checks if (finding := check(facts)) is not None)


def _events_disabled(facts: PoolFacts) -> Finding | None:
    if facts.telemetry is None or facts.telemetry.task_events is not False:
        return None
    fix = "worker.events: true" if facts.spec.worker else "add -E to the worker command"
    return Finding(
        AdviceKind.EVENTS_DISABLED, "workers run tasks without sending task events: service times are estimates", fix
    )


def _prefetch_imbalance(facts: PoolFacts) -> Finding | None:
    """Tasks sit prefetched on busy workers while another worker has nothing to do."""
    telemetry, queues = facts.telemetry, facts.queues
    if telemetry is None or not queues or any(q.reserved is None for q in queues.values()):
        return None
    concurrency = facts.spec.worker.concurrency if facts.spec.worker else 1
    held = sum(q.reserved or 0 for q in queues.values()) - telemetry.busy_slots  # reserved, not running
    idle = sorted(h for h, w in telemetry.workers.items() if w.online and w.active == 0)
    if held < concurrency or not idle:
        return None
    fix = "worker.prefetchMultiplier: 1" if facts.spec.worker else "--prefetch-multiplier=1 in the worker command"
    seen = f"{held} tasks wait prefetched on busy workers while {len(idle)} worker(s) idle ({', '.join(idle[:3])})"
    return Finding(AdviceKind.PREFETCH_IMBALANCE, seen, fix)


def _queue_without_consumers(facts: PoolFacts) -> Finding | None:
    """A queue of the pool fills while the broker counts no consumer on it, though workers run."""
    telemetry, queues = facts.telemetry, facts.queues
    if telemetry is None or not queues or not telemetry.live_workers:
        return None
    orphans = sorted(q.name for q in queues.values() if q.consumers == 0 and q.depth > 0)
    if not orphans:
        return None
    seen = f"{', '.join(orphans)}: messages wait and no worker consumes them ({telemetry.live_workers} workers online)"
    return Finding(AdviceKind.QUEUE_WITHOUT_CONSUMERS, seen, f"worker -Q must include {', '.join(orphans)}")


def _mixed_durations(facts: PoolFacts) -> Finding | None:
    """Long and short task types share the pool: short ones wait behind long ones."""
    if facts.telemetry is None:
        return None
    means = {
        task: stats.service_time_mean
        for task, stats in facts.telemetry.tasks.items()
        if stats.service_time_mean is not None and stats.completed >= MIXED_MIN_COMPLETED
    }
    if len(means) < 2:
        return None
    shortest, longest = min(means.values()), max(means.values())
    if longest < MIXED_MIN_SECONDS or longest < MIXED_RATIO * max(shortest, 1e-3):
        return None
    long_tasks = sorted(task for task, mean in means.items() if mean * MIXED_RATIO >= longest)
    seen = f"task run times from {shortest:.2g} s to {longest:.2g} s in one pool"
    fix = f"a second CeleryWorkerPool with its own queue for {', '.join(long_tasks)} (route them with task_routes)"
    return Finding(AdviceKind.MIXED_DURATIONS, seen, fix)


def _grace_too_short(facts: PoolFacts) -> Finding | None:
    """A task runs longer than a stopping worker is given: every scale-down kills it."""
    if facts.telemetry is None or facts.grace_seconds is None:
        return None
    longest = max(
        (s.service_time_p95 for s in facts.telemetry.tasks.values() if s.service_time_p95 is not None), default=None
    )
    if longest is None or longest <= facts.grace_seconds:
        return None
    seen = f"p95 task run time {longest:.3g} s exceeds the {facts.grace_seconds:g} s grace period"
    return Finding(AdviceKind.GRACE_TOO_SHORT, seen, f"worker.softShutdownSeconds: {math.ceil(longest)}")
