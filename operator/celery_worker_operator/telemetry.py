"""Celery events -> per-pool arrival and completion rates, service times, waits and worker liveness.

Two layers. `EventAggregator` is pure: feed it event dicts with a clock reading, ask it for a
`PoolTelemetry`. `EventMonitor` is the thin I/O edge around it: one daemon thread per broker URL
consuming the `celeryev` exchange with a plain kombu consumer. It decodes JSON and unbatches the
workers' `task.multi` messages itself: celery's `Receiver` + `State` keeps every task as an object
and tops out near 3,600 events/s, which a large cluster exceeds. It wakes the workers on every
(re)connect so they announce themselves at once, and reconnects with backoff after broker loss.

A worker belongs to the pool named before the first '@' of its hostname (`<pool>@<pod>`).
Rates are counted against the local clock when events arrive (workers' clocks may be skewed);
durations come from the worker's own timestamps, so a skew between hosts only touches the wait
from `task-sent`, which is stamped by the client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from celery import Celery
from celery.events.event import get_exchange
from kombu.entity import Queue
from kombu.messaging import Consumer

from ._window import Bucket, SeriesGroup, summarize
from .redact import redact, url_secrets

log = logging.getLogger(__name__)

Event = Mapping[str, Any]

EXPIRE_BEATS = 2.0  # Celery's HEARTBEAT_EXPIRE_WINDOW (200 %): offline after two missed heartbeats
DEFAULT_FREQ = 2.0  # Celery's default worker heartbeat interval, for workers not yet heard from
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # reconnect backoff: quick after a blip, never hammering a dead broker
AMQP_HEARTBEAT = 10.0  # notices a silently dead RabbitMQ connection within ~20 s
UNNAMED = ""  # the series of tasks whose name was lost (record expired): in the totals, not in `tasks`
DRAIN_TIMEOUT = 1.0  # how often the consumer looks at the stop flag when no event arrives
QUEUE_EXPIRES = 60.0  # an orphaned event queue (operator killed) vanishes from RabbitMQ after this


@dataclass(frozen=True, kw_only=True)
class TaskStats:
    """Rates per second and durations in seconds over the window; None where nothing was measured.

    `wait` is task-started minus task-received (time prefetched on a worker, waiting for a slot);
    `sent_wait` is task-started minus task-sent (the whole wait) and exists only when clients
    enable `task_send_sent_event`.
    """

    arrival_rate: float | None = None
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
class WorkerTelemetry:
    """One worker as its events show it; `active` is its busy slots at the last heartbeat."""

    hostname: str
    online: bool
    active: int
    processed: int
    last_heartbeat: float | None  # local clock when its last worker-* event arrived
    freq: float  # its heartbeat interval, seconds
    task_events: bool | None  # False: it processed tasks without sending task events (no -E)


@dataclass(frozen=True, kw_only=True)
class PoolTelemetry(TaskStats):
    """What the reconciler reads for one pool.

    `task_events` is True when the pool's workers send task events, False when heartbeats show
    them processing tasks without any (workers started without -E: then `completion_rate` and
    `service_time_mean` are estimated from heartbeats and the other rates are None), and None
    when nothing tells yet. `observed_seconds` is how long the stream has been watched: rates
    over a shorter time than the window are less certain.
    """

    pool: str
    observed_seconds: float
    task_events: bool | None
    busy_slots: int
    live_workers: int
    workers: Mapping[str, WorkerTelemetry]
    tasks: Mapping[str, TaskStats]


def pool_of(hostname: str) -> str:
    """The pool a worker belongs to: its hostname up to the first '@'."""
    return hostname.partition("@")[0]


class _Task:
    """A task between its first and last event; the only per-task state, and it expires."""

    __slots__ = ("born", "name", "received", "sent", "started")

    def __init__(self, born: float) -> None:
        self.born = born
        self.name: str | None = None
        self.sent: float | None = None
        self.received: float | None = None
        self.started: float | None = None


class _Pool:
    __slots__ = ("series", "workers")

    def __init__(self, width: float, count: int) -> None:
        self.series = SeriesGroup(width, count)
        self.workers: dict[str, _Worker] = {}


class _Worker:
    """Liveness and load of one worker; heartbeats in the window serve when task events are off."""

    __slots__ = (
        "active",
        "beats",
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
        self.last_seen = now
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
        self._next_sweep = 0.0
        self._handlers: dict[str, Callable[[Event, float], None]] = {
            "task-sent": self._sent,
            "task-received": self._received,
            "task-started": self._started,
            "task-succeeded": self._succeeded,
            "task-failed": self._failed,
            "task-retried": self._ended,
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
        """Mark when watching began, so early rates divide by the time watched, not the whole window."""
        if self._since is None:
            self._since = now

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
            self._since = now
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

    def snapshot(self, pool: str, now: float, queues: Sequence[str] = ()) -> PoolTelemetry:
        """The pool's numbers at `now`; `queues` (the pool's queues) attribute task-sent events to it."""
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
        )

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

    def _started(self, event: Event, now: float) -> None:
        worker = self._task_worker(event, now)
        task = self._tasks.get(event["uuid"])
        if task is None:  # received before we watched: nothing to measure the wait from
            return
        started = task.started = event["timestamp"]
        bucket = worker.pool.series.at(task.name or UNNAMED, now)
        if task.received is not None:
            bucket.wait.add(started - task.received, self._rng)
        if task.sent is not None:  # client clock vs worker clock: never report a negative wait
            bucket.sent_wait.add(max(0.0, started - task.sent), self._rng)

    def _succeeded(self, event: Event, now: float) -> None:
        worker = self._task_worker(event, now)
        task = self._tasks.pop(event["uuid"], None)
        runtime = event.get("runtime")
        bucket = self._outcome(worker, task, now)
        bucket.succeeded += 1
        if runtime is not None:
            bucket.runtime.add(float(runtime), self._rng)

    def _failed(self, event: Event, now: float) -> None:
        """A failure held a slot too: its run time (not in the event) counts towards service time."""
        worker = self._task_worker(event, now)
        task = self._tasks.pop(event["uuid"], None)
        runtime = None if task is None or task.started is None else event["timestamp"] - task.started
        bucket = self._outcome(worker, task, now)
        bucket.failed += 1
        if runtime is not None:
            bucket.runtime.add(max(0.0, runtime), self._rng)

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

    def _event_stats(
        self, state: _Pool | None, groups: list[SeriesGroup], now: float
    ) -> tuple[TaskStats, dict[str, TaskStats]]:
        span = self._span(now)
        received = state.series if state else SeriesGroup(self._width, self._count)

        def stats(name: str | None) -> TaskStats:
            return _stats(received.live(now, name), [b for g in groups for b in g.live(now, name)], span)

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


def _stats(received: list[Bucket], sent: list[Bucket], span: float) -> TaskStats:
    """Rates and durations of one pool or task over its live buckets.

    Arrivals are the larger of task-received (always there with -E) and task-sent (only from
    clients that enable it, but counts tasks still queued): either alone undercounts sometimes.
    """
    if span <= 0:
        return TaskStats()
    succeeded, failed = sum(b.succeeded for b in received), sum(b.failed for b in received)
    runtime = summarize(b.runtime for b in received)
    wait = summarize(b.wait for b in received)
    sent_wait = summarize(b.sent_wait for b in received)
    return TaskStats(
        arrival_rate=max(sum(b.arrived for b in received), sum(b.arrived for b in sent)) / span,
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


class EventMonitor:
    """Watches one broker's Celery event stream in a daemon thread; `snapshot` never blocks on I/O.

    Call `start()` once, `snapshot(pool, queues)` as often as needed, `stop()` at shutdown. The
    consumer's queue has Celery's 5 s message TTL by default, so a stalled monitor loses old
    events instead of piling them up on RabbitMQ.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        window: float = 60.0,
        exchange: str = "celeryev",
        queue_ttl: float | None = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker_url = broker_url
        self.name = redact(broker_url)  # for logs, the thread name and status: never the password
        self._aggregator = EventAggregator(window=window)
        self._app = Celery(set_as_current=False, broker=broker_url)
        self._app.conf.event_exchange = exchange
        self._queue_ttl = queue_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._retry = RETRY_MIN
        self._thread = threading.Thread(target=self._run, name=f"celery-events {self.name}", daemon=True)
        self.events = 0  # events consumed; a counter for status and the benchmark
        self.dropped = 0  # events or messages that could not be read
        self.connects = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> EventMonitor:
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        """True once subscribed (and the workers woken); for start-up checks and tests."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self, pool: str, queues: Sequence[str] = ()) -> PoolTelemetry:
        with self._lock:
            return self._aggregator.snapshot(pool, self._clock(), queues)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._consume()
            except Exception as error:  # whatever broke the connection, the answer is to reconnect
                self._connected.clear()
                self.last_error = redact(f"{type(error).__name__}: {error}", url_secrets(self.broker_url))
                log.warning(
                    "celery events from %s lost: %s; retrying in %.1f s", self.name, self.last_error, self._retry
                )
                self._stopping.wait(self._retry)
                self._retry = min(self._retry * 2, RETRY_MAX)
        self._connected.clear()

    def _consume(self) -> None:
        with self._app.connection_for_read(heartbeat=AMQP_HEARTBEAT) as connection, connection.channel() as channel:
            queue = Queue(  # type: ignore[no-untyped-call]
                f"celeryev.operator.{uuid.uuid4().hex}",
                get_exchange(connection, self._app.conf.event_exchange),
                routing_key="#",
                auto_delete=True,
                durable=False,
                message_ttl=self._queue_ttl,
                expires=QUEUE_EXPIRES,
            )
            consumer = Consumer(  # type: ignore[no-untyped-call]
                channel, queues=[queue], no_ack=True, accept=["json"], on_message=self._on_message
            )
            with consumer:
                self._wakeup(connection)
                self._on_connected()
                self._drain(connection)

    def _wakeup(self, connection: Any) -> None:
        """Ask every worker for a heartbeat now (celery's `wakeup=True`), once we can hear the answers.

        kombu's Redis transport subscribes to the fanout channel only inside the first
        `drain_events`; broadcasting before that (as celery's Receiver does) loses the replies
        of the workers that answer first, and a worker with a long heartbeat interval stays unseen.
        """
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.05)
        self._app.control.broadcast("heartbeat", connection=connection)

    def _on_connected(self) -> None:
        with self._lock:
            self._aggregator.observe_from(self._clock())
        self.connects += 1
        self._retry = RETRY_MIN
        self._connected.set()
        log.info("watching celery events on %s", self.name)

    def _drain(self, connection: Any) -> None:
        """Deliver events until stopped; AMQP heartbeats are ours to send, even while busy."""
        due = time.monotonic()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):  # socket.timeout is an alias
                connection.drain_events(timeout=DRAIN_TIMEOUT)
            if time.monotonic() >= due:
                connection.heartbeat_check()
                due = time.monotonic() + 1.0

    def _on_message(self, message: Any) -> None:
        try:
            body = json.loads(message.body) if message.content_type == "application/json" else message.decode()
            events = unbatch(body)
        except Exception as error:  # a foreign or corrupt message must not stop the stream
            self.dropped += 1
            log.debug("unreadable event message on %s: %s", self.name, error)
            return
        now = self._clock()
        with self._lock:
            self.dropped += self._aggregator.feed_many(events, now)
            self.events += len(events)


class TelemetryMonitors:
    """One `EventMonitor` per broker URL, started on first use and shared by every pool on it."""

    def __init__(self, *, window: float = 60.0, exchange: str = "celeryev") -> None:
        self._window, self._exchange = window, exchange
        self._monitors: dict[str, EventMonitor] = {}
        self._lock = threading.Lock()

    def monitor(self, broker_url: str) -> EventMonitor:
        with self._lock:
            monitor = self._monitors.get(broker_url)
            if monitor is None:
                monitor = EventMonitor(broker_url, window=self._window, exchange=self._exchange).start()
                self._monitors[broker_url] = monitor
            return monitor

    def snapshot(self, broker_url: str, pool: str, queues: Sequence[str] = ()) -> PoolTelemetry:
        return self.monitor(broker_url).snapshot(pool, queues)

    def stop(self) -> None:
        with self._lock:
            monitors, self._monitors = list(self._monitors.values()), {}
        for monitor in monitors:
            monitor.stop()
