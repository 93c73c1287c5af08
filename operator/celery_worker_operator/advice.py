"""PURE: the operations guide's pitfalls, found in a pool's own numbers, each with a concrete fix.

The guide (reference/celery-monitoring-operations.md, "Best Practices" and "Common Pitfalls") lists
mistakes nobody detects for the user; this module reads them from what one pass measured anyway
(task events, the broker probe, the spec) and says which spec field to set to what. A finding holds
only while its cause is measured now, so it clears itself; none of them ever changes a decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .brokers.base import QueueStats
from .control.plan import WorkerStats
from .spec import CeleryWorkerPoolSpec
from .telemetry.model import PoolTelemetry

MIXED_RATIO = 10.0  # the longest task type runs this many times the shortest: the guide's "route long and short apart"
MIXED_MIN_SECONDS = 1.0  # ... and takes at least this long, so sub-second noise is no finding
MIXED_MIN_COMPLETED = 5  # completions per task type in the window before its duration counts
LEAK_MIN_KIB = 50 * 1024  # a worker's RSS grew this much since it was first seen ...
LEAK_MIN_TASKS = 10  # ... over at least this many tasks: a leak, not a warm-up
RECYCLE_HEADROOM_KIB = 200 * 1024  # suggested maxMemoryPerChild: the first-seen RSS plus this
ETA_LIMIT_FLOOR = 10  # the smallest worker_eta_task_limit suggested
REDIS_VISIBILITY_TIMEOUT = 3600.0  # kombu's default visibility_timeout on Redis
CLEAR_AFTER_PASSES = 3  # a finding goes once it is absent this many passes in a row: no Warning per flap


class AdviceKind(StrEnum):
    """One pitfall of the operations guide; the `Advice` condition, Events and metrics name these."""

    EVENTS_DISABLED = "EventsDisabled"
    PREFETCH_IMBALANCE = "PrefetchImbalance"
    QUEUE_WITHOUT_CONSUMERS = "QueueWithoutConsumers"
    MIXED_DURATIONS = "MixedDurations"
    GRACE_TOO_SHORT = "GraceTooShort"
    MEMORY_WITHOUT_RECYCLING = "MemoryWithoutRecycling"
    PREFETCH_DRIFT = "PrefetchDrift"
    VISIBILITY_TIMEOUT_TOO_SHORT = "VisibilityTimeoutTooShort"


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
    """One pass's measurements as the advisor reads them; None or empty where something was not measured.

    `workers` is each worker's `inspect stats`/`conf` now, `baselines` the same when it was first seen.
    """

    spec: CeleryWorkerPoolSpec
    telemetry: PoolTelemetry | None
    queues: Mapping[str, QueueStats] | None
    grace_seconds: float | None  # what a stopping worker gets before SIGKILL (managed pools)
    workers: Mapping[str, WorkerStats] = field(default_factory=dict)
    baselines: Mapping[str, WorkerStats] = field(default_factory=dict)
    broker_url: str | None = None


Held = Mapping[AdviceKind, tuple[Finding, int]]  # each finding in force, and the passes it has been absent


def settle(held: Held, findings: tuple[Finding, ...]) -> tuple[dict[AdviceKind, tuple[Finding, int]], list[Finding]]:
    """The findings in force after this pass, and those that just started (one Warning each).

    Numbers near a threshold (heartbeats lag the broker by seconds) would make a finding flap; it
    stays, with its last text, until absent for CLEAR_AFTER_PASSES passes in a row.
    """
    found = {finding.kind: (finding, 0) for finding in findings}
    fading = {
        kind: (finding, misses + 1)
        for kind, (finding, misses) in held.items()
        if kind not in found and misses + 1 < CLEAR_AFTER_PASSES
    }
    started = [finding for finding in findings if finding.kind not in held]
    merged = {**fading, **found}
    return {kind: merged[kind] for kind in AdviceKind if kind in merged}, started


def advise(facts: PoolFacts) -> tuple[Finding, ...]:
    """Every finding that holds now, in a fixed order."""
    checks = (
        _events_disabled,
        _prefetch_imbalance,
        _queue_without_consumers,
        _mixed_durations,
        _grace_too_short,
        _memory_without_recycling,
        _prefetch_drift,
        _visibility_timeout_too_short,
    )
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
    worker = facts.spec.worker
    if worker is not None and (worker.prefetch_multiplier == 1 or worker.disable_prefetch):
        return None  # one message per slot: what waits on a worker is the next task of a free slot, no more
    concurrency = worker.concurrency if worker else 1
    held = sum(q.reserved or 0 for q in queues.values()) - telemetry.busy_slots  # reserved, not running
    idle = sorted(h for h, w in telemetry.workers.items() if w.online and w.active == 0)
    busy = [h for h, w in telemetry.workers.items() if w.online and w.active > 0]
    # Someone must be seen busy: a lone worker that just took the queue still shows 0 until its next heartbeat.
    if held < concurrency or not idle or not busy:
        return None
    fix = "worker.prefetchMultiplier: 1" if worker else "--prefetch-multiplier=1 in the worker command"
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


def _memory_without_recycling(facts: PoolFacts) -> Finding | None:
    """A worker's memory grows task after task and nothing recycles it."""
    worker = facts.spec.worker
    if worker is None or worker.max_memory_per_child is not None or worker.max_tasks_per_child is not None:
        return None
    grown = {name: g for name, now in facts.workers.items() if (g := _growth(now, facts.baselines.get(name)))}
    leaking = {n: g for n, g in grown.items() if g[0] >= LEAK_MIN_KIB and g[1] >= LEAK_MIN_TASKS}
    if not leaking:
        return None
    name, (growth, tasks, base_kib) = max(leaking.items(), key=lambda item: item[1][0])
    seen = f"{name}: RSS grew {growth / 1024:.0f} MiB over {tasks} tasks and no maxMemoryPerChild recycles it"
    fix = f"worker.maxMemoryPerChild: {base_kib + RECYCLE_HEADROOM_KIB}"
    if worker.pool != "prefork":
        fix += " with worker.pool: prefork (Celery recycles prefork children only)"
    return Finding(AdviceKind.MEMORY_WITHOUT_RECYCLING, seen, fix)


def _growth(now: WorkerStats, base: WorkerStats | None) -> tuple[int, int, int] | None:
    """(RSS growth KiB, tasks run, first RSS KiB) since the baseline, when both samples have the numbers."""
    if base is None or now.rss_kib is None or now.processed is None:
        return None
    if base.rss_kib is None or base.processed is None:
        return None
    return now.rss_kib - base.rss_kib, now.processed - base.processed, base.rss_kib


def _prefetch_drift(facts: PoolFacts) -> Finding | None:
    """A worker reserves more than concurrency x multiplier: Celery raises prefetch_count by one for
    every ETA/countdown task it holds, without bound unless `worker_eta_task_limit` caps it."""
    expected = _expected_prefetch(facts.spec)
    if expected is None:
        return None
    drifted = {
        name: stats.prefetch_count
        for name, stats in facts.workers.items()
        if stats.prefetch_count is not None and stats.prefetch_count > max(expected, stats.eta_task_limit or 0)
    }
    if not drifted:
        return None
    name, count = max(drifted.items(), key=lambda item: item[1])
    seen = f"{name}: prefetch_count {count} above concurrency x multiplier = {expected} (ETA/countdown tasks held)"
    limit = max(2 * expected, ETA_LIMIT_FLOOR)
    return Finding(AdviceKind.PREFETCH_DRIFT, seen, f"worker.extraArgs: worker_eta_task_limit={limit}")


def _expected_prefetch(spec: CeleryWorkerPoolSpec) -> int | None:
    """What a managed worker reserves at most; an adopted pool's settings are not known to the advisor."""
    worker = spec.worker
    if worker is not None:
        return worker.concurrency * (1 if worker.disable_prefetch else worker.prefetch_multiplier)
    return None


def _visibility_timeout_too_short(facts: PoolFacts) -> Finding | None:
    """On Redis, a task running longer than visibility_timeout is delivered again while it runs."""
    if not _on_redis(facts) or not facts.workers:
        return None
    timeouts = [s.visibility_timeout or REDIS_VISIBILITY_TIMEOUT for s in facts.workers.values()]
    visibility = min(timeouts)
    runtimes = [s.service_time_p95 for s in facts.telemetry.tasks.values()] if facts.telemetry else []
    hard_limits = [t.hard for t in facts.spec.limits.time_limits.values()]
    longest = max((t for t in [*runtimes, *hard_limits] if t is not None), default=None)
    if longest is None or longest < visibility:
        return None
    seen = f"tasks run up to {longest:.3g} s (p95 or hard limit) and Redis redelivers after {visibility:g} s"
    enough = math.ceil(2 * longest)
    fix = (
        f"broker.transportOptions.visibility_timeout: {enough} (and the same in the app's own config)"
        if facts.spec.worker
        else f"visibility_timeout {enough} in the app's broker_transport_options"
    )
    return Finding(AdviceKind.VISIBILITY_TIMEOUT_TOO_SHORT, seen, fix)


def _on_redis(facts: PoolFacts) -> bool:
    url = facts.broker_url or facts.spec.broker.url or ""
    return url.startswith(("redis://", "rediss://"))
