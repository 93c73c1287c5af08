"""Celery events -> per-pool arrival and completion rates, service times, waits and worker liveness.

`EventAggregator` is pure: feed it event dicts with a clock reading, ask it for a `PoolTelemetry`.
Memory is bounded by pools, task names and workers, never by the event count (see window.py).
A worker belongs to the pool its hostname names (naming.py: `<pool>.<namespace>`); a legacy worker
(`<pool>@<member>`) to the pool that claims it at a snapshot, the first that does.
Rates are counted against the local clock when events arrive (workers' clocks may be skewed);
durations come from the worker's own timestamps, so a skew between hosts only touches the wait
from `task-sent`, which is stamped by the client.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..naming import pool_of
from .model import HistogramTotals, PoolTelemetry, TaskStats, TaskTotals, WorkerTelemetry
from .window import Bucket, SeriesGroup, summarize

Event = Mapping[str, Any]

EXPIRE_BEATS = 2.0  # Celery's HEARTBEAT_EXPIRE_WINDOW (200 %): offline after two missed heartbeats
DEFAULT_FREQ = 2.0  # Celery's default worker heartbeat interval, for workers not yet heard from
RECENT_SECONDS = 10.0  # the recent arrival rate's window (rounded to whole buckets, at least one)
UNNAMED = ""  # the series of tasks whose name was lost (record expired): in the totals, not in `tasks`
MAX_TASK_NAMES = 100  # task names counted apart per pool; the rest add up under OTHER_TASKS
OTHER_TASKS = "other"
UNKNOWN_TASK = "unknown"  # the totals' name for tasks whose name was lost
# Prometheus client's default buckets, with room for tasks and waits of minutes to an hour.
HISTOGRAM_BOUNDS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"),
)  # fmt: skip


class _Task:
    """A task between its first and last event; the only per-task state, and it expires."""

    __slots__ = ("born", "name", "received", "sent", "started")

    def __init__(self, born: float) -> None:
        self.born = born
        self.name: str | None = None
        self.sent: float | None = None
        self.received: float | None = None
        self.started: float | None = None


class _Histogram:
    """Counts per bucket of HISTOGRAM_BOUNDS and the sum; one bisect per value, cumulated when read."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(HISTOGRAM_BOUNDS)
        self.total = 0.0

    def add(self, value: float) -> None:
        self.total += value
        self.counts[bisect.bisect_left(HISTOGRAM_BOUNDS, value)] += 1

    def totals(self) -> HistogramTotals:
        return HistogramTotals(HISTOGRAM_BOUNDS, tuple(itertools.accumulate(self.counts)), self.total)


class _Totals:
    """Task events of one task name since watching began (counters never go down)."""

    __slots__ = ("failed", "received", "retried", "runtime", "started", "succeeded", "wait")

    def __init__(self) -> None:
        self.received = self.started = self.succeeded = self.failed = self.retried = 0
        self.runtime, self.wait = _Histogram(), _Histogram()

    def frozen(self) -> TaskTotals:
        return TaskTotals(
            received=self.received,
            started=self.started,
            succeeded=self.succeeded,
            failed=self.failed,
            retried=self.retried,
            runtime=self.runtime.totals(),
            wait=self.wait.totals(),
        )


class _Pool:
    __slots__ = ("series", "totals", "workers")

    def __init__(self, width: float, count: int) -> None:
        self.series = SeriesGroup(width, count)
        self.workers: dict[str, _Worker] = {}
        self.totals: dict[str, _Totals] = {}

    def totals_of(self, name: str | None) -> _Totals:
        """The counters of task `name`; past MAX_TASK_NAMES names, the shared OTHER_TASKS ones."""
        key = name or UNKNOWN_TASK
        totals = self.totals.get(key)
        if totals is None:
            key = key if len(self.totals) < MAX_TASK_NAMES else OTHER_TASKS
            totals = self.totals.get(key) or self.totals.setdefault(key, _Totals())
        return totals


class _Worker:
    """Liveness and load of one worker; heartbeats in the window serve when task events are off."""

    __slots__ = (
        "active",
        "beats",
        "first_heard",
        "freq",
        "hostname",
        "last_heartbeat",
        "last_seen",
        "left",
        "pool",
        "processed",
        "task_events",
    )

    def __init__(self, hostname: str, pool: _Pool, now: float) -> None:
        self.hostname, self.pool = hostname, pool
        self.first_heard = self.last_seen = now
        self.last_heartbeat: float | None = None
        self.freq: float | None = None
        self.left = False  # said worker-offline
        self.active = self.processed = 0
        self.beats: deque[tuple[float, int, int]] = deque()  # (local time, processed, active)
        self.task_events = False

    def online(self, now: float) -> bool:
        return not self.left and now - self.last_seen <= EXPIRE_BEATS * (self.freq or DEFAULT_FREQ)

    def sends_task_events(self) -> bool | None:
        """True once a task event came; False once two heartbeats in a row show work done without one."""
        if self.task_events:
            return True
        beats = self.beats
        if len(beats) >= 3 and beats[-2][1] > beats[0][1]:
            return False
        return None

    def telemetry(self, now: float) -> WorkerTelemetry:
        return WorkerTelemetry(
            hostname=self.hostname,
            online=self.online(now),
            active=self.active,
            processed=self.processed,
            last_heartbeat=self.last_heartbeat,
            freq=self.freq or DEFAULT_FREQ,
            task_events=self.sends_task_events(),
            first_heard=self.first_heard,
        )


class EventAggregator:
    """Folds Celery events into bounded per-pool windows. Pure: the caller supplies the clock.

    Memory is bounded by the number of pools, task names and workers, never by the event count:
    in-flight tasks expire after `in_flight_ttl` seconds (and beyond `max_in_flight` the oldest go
    first), workers offline for a whole window are forgotten, idle series are dropped.
    """

    def __init__(
        self,
        window: float = 60.0,
        buckets: int = 30,
        in_flight_ttl: float = 3600.0,
        max_in_flight: int = 100_000,
        seed: int = 0,
    ) -> None:
        self.window, self._count = window, buckets
        self._width = window / buckets
        self._in_flight_ttl, self._max_in_flight = in_flight_ttl, max_in_flight
        self._rng = random.Random(seed)
        self._pools: dict[str, _Pool] = {}
        self._queues: dict[str, SeriesGroup] = {}
        self._workers: dict[str, _Worker] = {}
        self._tasks: dict[str, _Task] = {}
        self._since: float | None = None
        self._unbroken_since: float | None = None  # the stream's latest (re)connection: nothing lost after it
        self._next_sweep = 0.0
        self._handlers: dict[str, Callable[[Event, float], None]] = {
            "task-sent": self._sent,
            "task-received": self._received,
            "task-started": self._started,
            "task-succeeded": self._succeeded,
            "task-failed": self._failed,
            "task-retried": self._retried,
            "task-revoked": self._ended,
            "task-rejected": self._ended,
            "worker-online": self._heartbeat,
            "worker-heartbeat": self._heartbeat,
            "worker-offline": self._offline,
        }

    @property
    def in_flight(self) -> int:
        """Tasks remembered between their events: bounded, see the class docstring."""
        return len(self._tasks)

    def observe_from(self, now: float) -> None:
        """Mark when watching (re)began: early rates divide by the time watched since it first began,
        not the whole window; a worker started before the latest (re)connection may have spoken while
        the stream was cut, so its start-up is not measured (`PoolTelemetry.watching_since`)."""
        if self._since is None:
            self._since = now
        self._unbroken_since = now

    def feed(self, event: Event, now: float) -> None:
        """Fold one event in; raises KeyError on an event that lacks what its type needs."""
        if self.feed_many((event,), now):
            raise KeyError(f"event lacks what a {event.get('type')!r} event needs: {event!r}")

    def feed_many(self, events: Iterable[Event], now: float) -> int:
        """Fold in the events of one message (all arrived at `now`); returns how many were unreadable.

        The hot path: per event one handler call, one dict lookup of the worker and of the task,
        one bucket; clock upkeep happens once per message.
        """
        if self._since is None:
            self.observe_from(now)
        if now >= self._next_sweep:
            self._sweep(now)
        handlers, unreadable = self._handlers, 0
        for event in events:
            try:
                handler = handlers.get(event["type"])
                if handler is not None:
                    handler(event, now)
            except (KeyError, TypeError, ValueError, AttributeError):  # a foreign or corrupt event
                unreadable += 1
        return unreadable

    def pools(self) -> list[str]:
        return sorted(self._pools)

    def snapshot(self, pool: str, now: float, queues: Sequence[str] = (), claim: Collection[str] = ()) -> PoolTelemetry:
        """The numbers at `now` of the pool whose workers are named `<pool>@...`; `queues` (the pool's
        queues) attribute task-sent events to it; `claim` names legacy workers that are the pool's own
        (naming.PoolIdentity.legacy_hostnames), which are counted with it from now on."""
        self._claim(pool, claim)
        state = self._pools.get(pool)
        workers = list(state.workers.values()) if state else []
        reports = {w.hostname: w.telemetry(now) for w in workers}
        task_events = _pool_task_events(reports.values())
        groups = [self._queues[q] for q in queues if q in self._queues]
        if task_events is False:
            totals, tasks = self._heartbeat_stats(workers, now), dict[str, TaskStats]()
        else:
            totals, tasks = self._event_stats(state, groups, now)
        online = [r for r in reports.values() if r.online]
        return PoolTelemetry(
            **{f.name: getattr(totals, f.name) for f in fields(TaskStats)},
            pool=pool,
            observed_seconds=0.0 if self._since is None else max(0.0, now - self._since),
            task_events=task_events,
            busy_slots=sum(r.active for r in online),
            live_workers=len(online),
            workers=reports,
            tasks=tasks,
            totals={name: totals.frozen() for name, totals in state.totals.items()} if state else {},
            watching_since=self._unbroken_since,
        )

    def _claim(self, pool: str, hostnames: Collection[str]) -> None:
        """Move the named workers, if still in the group their own hostname names (nobody claimed
        them yet), to `pool`: their later events count for it. Earlier ones stay where they fell."""
        for hostname in hostnames:
            worker = self._workers.get(hostname)
            if worker is None or worker.pool is not self._pools.get(pool_of(hostname)) or pool_of(hostname) == pool:
                continue
            state = self._pools.get(pool) or self._pools.setdefault(pool, _Pool(self._width, self._count))
            del worker.pool.workers[hostname]
            worker.pool, state.workers[hostname] = state, worker

    # --- events -------------------------------------------------------------------------------

    def _worker(self, event: Event, now: float) -> _Worker:
        """The worker that sent `event`, created on first sight; any event proves it alive."""
        hostname = event["hostname"]
        worker = self._workers.get(hostname)
        if worker is None:
            name = pool_of(hostname)
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = _Pool(self._width, self._count)
            worker = self._workers[hostname] = pool.workers[hostname] = _Worker(hostname, pool, now)
        worker.last_seen = now
        worker.left = False
        return worker

    def _task(self, task_id: str, now: float) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            task = self._tasks[task_id] = _Task(now)
            if len(self._tasks) > self._max_in_flight:
                self._expire_tasks(now)
        return task

    def _sent(self, event: Event, now: float) -> None:
        """task-sent comes from a client, not a worker: it belongs to the queue it was routed to."""
        task = self._task(event["uuid"], now)
        task.name = task.name or event.get("name")
        task.sent = event["timestamp"]
        queue = event.get("queue") or event.get("routing_key") or ""
        group = self._queues.get(queue)
        if group is None:
            group = self._queues[queue] = SeriesGroup(self._width, self._count)
        group.at(task.name or UNNAMED, now).arrived += 1

    def _received(self, event: Event, now: float) -> None:
        worker = self._task_worker(event, now)
        task = self._task(event["uuid"], now)
        task.name = event.get("name") or task.name
        task.received = event["timestamp"]
        worker.pool.series.at(task.name or UNNAMED, now).arrived += 1
        worker.pool.totals_of(task.name).received += 1

    def _started(self, event: Event, now: float) -> None:
        worker = self._task_worker(event, now)
        task = self._tasks.get(event["uuid"])
        totals = worker.pool.totals_of(task.name if task else None)
        totals.started += 1
        if task is None:  # received before we watched: nothing to measure the wait from
            return
        started = task.started = event["timestamp"]
        bucket = worker.pool.series.at(task.name or UNNAMED, now)
        if task.received is not None:
            bucket.wait.add(started - task.received, self._rng)
            totals.wait.add(max(0.0, started - task.received))
        if task.sent is not None:  # client clock vs worker clock: never report a negative wait
            bucket.sent_wait.add(max(0.0, started - task.sent), self._rng)

    def _succeeded(self, event: Event, now: float) -> None:
        worker = self._task_worker(event, now)
        task = self._tasks.pop(event["uuid"], None)
        runtime = event.get("runtime")
        bucket = self._outcome(worker, task, now)
        bucket.succeeded += 1
        totals = worker.pool.totals_of(task.name if task else None)
        totals.succeeded += 1
        if runtime is not None:
            bucket.runtime.add(float(runtime), self._rng)
            totals.runtime.add(float(runtime))

    def _failed(self, event: Event, now: float) -> None:
        """A failure held a slot too: its run time (not in the event) counts towards service time."""
        worker = self._task_worker(event, now)
        task = self._tasks.pop(event["uuid"], None)
        runtime = None if task is None or task.started is None else event["timestamp"] - task.started
        bucket = self._outcome(worker, task, now)
        bucket.failed += 1
        totals = worker.pool.totals_of(task.name if task else None)
        totals.failed += 1
        if runtime is not None:
            bucket.runtime.add(max(0.0, runtime), self._rng)
            totals.runtime.add(max(0.0, runtime))

    def _retried(self, event: Event, now: float) -> None:
        """A retry ends this delivery; the task comes back as a new task-received."""
        task = self._tasks.get(event["uuid"])
        self._task_worker(event, now).pool.totals_of(task.name if task else None).retried += 1
        self._ended(event, now)

    def _ended(self, event: Event, now: float) -> None:
        self._task_worker(event, now)
        self._tasks.pop(event["uuid"], None)

    def _task_worker(self, event: Event, now: float) -> _Worker:
        worker = self._worker(event, now)
        worker.task_events = True
        return worker

    def _outcome(self, worker: _Worker, task: _Task | None, now: float) -> Bucket:
        return worker.pool.series.at(task.name or UNNAMED if task else UNNAMED, now)

    def _heartbeat(self, event: Event, now: float) -> None:
        worker = self._worker(event, now)
        worker.last_heartbeat = now
        active = event.get("active")
        if active is None:
            # A reply to our wakeup (the `heartbeat` control command) has no counters and says
            # freq=5 whatever the worker's real interval; it only stands in until a real beat.
            worker.freq = worker.freq or float(event.get("freq") or DEFAULT_FREQ)
            return
        worker.freq = float(event.get("freq") or DEFAULT_FREQ)
        worker.active, worker.processed = int(active), int(event.get("processed") or 0)
        beats = worker.beats
        beats.append((now, worker.processed, worker.active))
        while beats[0][0] < now - self.window:
            beats.popleft()

    def _offline(self, event: Event, now: float) -> None:
        self._worker(event, now).left = True

    # --- upkeep -------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Once per bucket: expire in-flight tasks, forget long-gone workers, drop idle series."""
        self._next_sweep = now + self._width
        self._expire_tasks(now)
        gone = [w for w in self._workers.values() if now - w.last_seen > self.window + EXPIRE_BEATS * (w.freq or 0)]
        for worker in gone:
            del self._workers[worker.hostname], worker.pool.workers[worker.hostname]
        for name, pool in list(self._pools.items()):
            if pool.series.drop_idle(now) and not pool.workers:
                del self._pools[name]
        for queue, group in list(self._queues.items()):
            if group.drop_idle(now):
                del self._queues[queue]

    def _expire_tasks(self, now: float) -> None:
        """Drop tasks older than the TTL and, over the cap, the oldest: insertion order is age order."""
        cutoff, excess = now - self._in_flight_ttl, len(self._tasks) - self._max_in_flight
        stale: list[str] = []
        for task_id, task in self._tasks.items():
            if task.born >= cutoff and len(stale) >= excess:
                break
            stale.append(task_id)
        for task_id in stale:
            del self._tasks[task_id]

    # --- snapshots ----------------------------------------------------------------------------

    def _span(self, now: float) -> float:
        """Seconds the live buckets cover: the window, or less while watching has just begun."""
        window_start = (int(now / self._width) - self._count + 1) * self._width
        return now - max(window_start, self._since if self._since is not None else now)

    def _recent(self, now: float) -> tuple[int, float]:
        """The first bucket index of the recent window, and the seconds it covers."""
        buckets = max(1, min(self._count, round(RECENT_SECONDS / self._width)))
        first = int(now / self._width) - buckets + 1
        return first, now - max(first * self._width, self._since if self._since is not None else now)

    def _event_stats(
        self, state: _Pool | None, groups: list[SeriesGroup], now: float
    ) -> tuple[TaskStats, dict[str, TaskStats]]:
        span, recent = self._span(now), self._recent(now)
        received = state.series if state else SeriesGroup(self._width, self._count)

        def stats(name: str | None) -> TaskStats:
            return _stats(received.live(now, name), [b for g in groups for b in g.live(now, name)], span, recent)

        names = set(received.tasks).union(*(g.tasks for g in groups)) - {UNNAMED}
        return stats(None), {name: stats(name) for name in sorted(names)}

    def _heartbeat_stats(self, workers: Iterable[_Worker], now: float) -> TaskStats:
        """Without task events: throughput from `processed` deltas, service time by Little's law
        (mean busy slots / throughput), both from the heartbeats in the window."""
        rate = busy = 0.0
        for worker in workers:
            beats = [b for b in worker.beats if b[0] >= now - self.window]
            if len(beats) >= 2 and beats[-1][0] > beats[0][0]:
                rate += max(0, beats[-1][1] - beats[0][1]) / (beats[-1][0] - beats[0][0])
            if beats and worker.online(now):
                busy += sum(b[2] for b in beats) / len(beats)
        return TaskStats(completion_rate=rate, service_time_mean=busy / rate if rate > 0 else None)


def _stats(received: list[Bucket], sent: list[Bucket], span: float, recent: tuple[int, float]) -> TaskStats:
    """Rates and durations of one pool or task over its live buckets (and the recent ones among them).

    Arrivals are the larger of task-received (always there with -E) and task-sent (only from
    clients that enable it, but counts tasks still queued): either alone undercounts sometimes.
    """
    if span <= 0:
        return TaskStats()
    first, recent_span = recent
    succeeded, failed = sum(b.succeeded for b in received), sum(b.failed for b in received)
    runtime = summarize(b.runtime for b in received)
    wait = summarize(b.wait for b in received)
    sent_wait = summarize(b.sent_wait for b in received)
    return TaskStats(
        arrival_rate=_arrivals(received, sent) / span,
        arrival_rate_recent=_arrivals(received, sent, first) / recent_span if recent_span > 0 else None,
        completion_rate=(succeeded + failed) / span,
        failure_rate=failed / span,
        completed=succeeded + failed,
        service_time_mean=runtime.mean,
        service_time_p95=runtime.p95,
        wait_mean=wait.mean,
        wait_p95=wait.p95,
        sent_wait_mean=sent_wait.mean,
        sent_wait_p95=sent_wait.p95,
    )


def _arrivals(received: list[Bucket], sent: list[Bucket], first: int = -1) -> int:
    """Arrivals in the buckets from index `first` on: the larger of the received and the sent count."""
    return max(sum(b.arrived for b in received if b.index >= first), sum(b.arrived for b in sent if b.index >= first))


def _pool_task_events(workers: Iterable[WorkerTelemetry]) -> bool | None:
    """True if any worker sends task events, False if some provably do not, else None."""
    verdicts = {w.task_events for w in workers}
    if True in verdicts:
        return True
    return False if False in verdicts else None


def unbatch(body: object) -> Sequence[Event]:
    """Events in one message body: workers send task events in `task.multi` lists of up to 24."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        return (body,)
    raise TypeError(f"an event message body is a dict or a list, not {type(body).__name__}")
