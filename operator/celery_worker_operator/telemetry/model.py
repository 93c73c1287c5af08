"""What telemetry tells about a pool, its workers and its tasks: plain frozen records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class TaskStats:
    """Rates per second and durations in seconds over the window; None where nothing was measured.

    `wait` is task-started minus task-received (time prefetched on a worker, waiting for a slot);
    `sent_wait` is task-started minus task-sent (the whole wait) and exists only when clients
    enable `task_send_sent_event`.
    """

    arrival_rate: float | None = None
    arrival_rate_recent: float | None = None  # over the last RECENT_SECONDS: a burst leaves it first
    completion_rate: float | None = None
    failure_rate: float | None = None
    completed: int = 0
    service_time_mean: float | None = None
    service_time_p95: float | None = None
    wait_mean: float | None = None
    wait_p95: float | None = None
    sent_wait_mean: float | None = None
    sent_wait_p95: float | None = None


@dataclass(frozen=True)
class HistogramTotals:
    """Counts since watching began, as a Prometheus histogram holds them: `counts[i]` values were
    at most `bounds[i]` (cumulative; the last bound is +Inf), `total` is their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


@dataclass(frozen=True, kw_only=True)
class TaskTotals:
    """Task events of one task name since watching began: the counters celery-exporter exports."""

    received: int = 0
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    runtime: HistogramTotals
    wait: HistogramTotals  # task-started minus task-received


@dataclass(frozen=True)
class WorkerTelemetry:
    """One worker as its events show it; `active` is its busy slots at the last heartbeat."""

    hostname: str
    online: bool
    active: int
    processed: int
    last_heartbeat: float | None  # local clock when its last worker-* event arrived
    freq: float  # its heartbeat interval, seconds
    task_events: bool | None  # False: it processed tasks without sending task events (no -E)
    first_heard: float | None = None  # local clock when its first event arrived (its start-up ends there)


@dataclass(frozen=True, kw_only=True)
class PoolTelemetry(TaskStats):
    """What the reconciler reads for one pool.

    `task_events` is True when the pool's workers send task events, False when heartbeats show them
    processing tasks without any (workers started without -E: then `completion_rate` and
    `service_time_mean` are estimated from heartbeats and the other rates are None), and None
    when nothing tells yet. `observed_seconds` is how long the stream has been watched: rates
    over a shorter time than the window are less certain; `watching_since` is when the stream
    was last (re)connected (local clock): a worker started before may have spoken while nobody
    listened. `totals` counts task events since watching began, per task name, at most a bounded
    number of names (the rest under "other").
    """

    pool: str
    observed_seconds: float
    task_events: bool | None
    busy_slots: int
    live_workers: int
    workers: Mapping[str, WorkerTelemetry]
    tasks: Mapping[str, TaskStats]
    totals: Mapping[str, TaskTotals] = field(default_factory=dict)
    watching_since: float | None = None
