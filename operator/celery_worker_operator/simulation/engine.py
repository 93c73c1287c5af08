"""A discrete-event simulator of a Celery queue feeding a pool of workers. Pure: no I/O.

It models what decides waits and cost in a real pool: worker start-up delay, concurrency,
prefetch with late acks (a worker holds at most concurrency x multiplier unacked messages),
the polling interval of the scaler (and its looks at the queue between polls, if it has any), and
what a scale-down does to a worker: Kubernetes sends
SIGTERM, Celery stops consuming, returns its prefetched messages and finishes running tasks
within the grace period; a task still running then is killed and redelivered. Which workers go
is the scaler's choice: ours removes only idle workers (marked with pod-deletion-cost; a smaller
step now, the rest at a later poll); a ReplicaSet left alone removes the youngest pods, busy or not.
"""

from __future__ import annotations

import bisect
import csv
import heapq
import itertools
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..policy import WAKE_CHECK_SECONDS, Observation, QueueObservation

RATE_WINDOW = 60.0  # seconds of arrivals behind the measured arrival rate
RECENT_WINDOW = 10.0  # seconds of arrivals behind the recent arrival rate
SERVICE_WINDOW = 300.0  # seconds of completions behind the measured service time
Removal = Literal["idle_only", "youngest"]
# A `celery worker` process consumes this long after it is started on a quiet 2-core machine
# (2.2 s measured; tests/integration/test_simulator_calibration.py prints it, and holds the model
# within 15 % of a real pool); a pod adds scheduling and image pulls, hence PoolModel's 10 s.
LOCAL_STARTUP_SECONDS = 2.5


@dataclass(frozen=True)
class Task:
    arrival: float
    duration: float
    name: str = "task"


@dataclass(frozen=True)
class PoolModel:
    """The physical pool: what no scaling policy can change."""

    concurrency: int
    startup_seconds: float = 10.0
    prefetch_multiplier: int = 1
    grace_seconds: float = 30.0  # terminationGracePeriodSeconds
    queue: str = "celery"


class Scaler(Protocol):
    """A scaling policy as the simulator drives it."""

    @property
    def name(self) -> str: ...

    @property
    def poll_seconds(self) -> float: ...

    @property
    def removal(self) -> Removal: ...

    def initial_replicas(self) -> int: ...

    def desired(self, obs: Observation) -> int: ...

    def wakes(self, waiting: int) -> bool:
        """Whether a look at the queue between polls (`waiting` ready messages) starts a poll now."""
        ...

    def explain(self) -> str:
        """What drove the scaler's decisions over the run, in a line ("" when there is nothing to say)."""
        ...


@dataclass
class Worker:
    created: float
    ready_at: float
    running: dict[int, float] = field(default_factory=dict)  # task index -> finish time
    reserved: deque[int] = field(default_factory=deque)
    stopping_at: float | None = None
    exited_at: float | None = None

    def load(self) -> int:
        return len(self.running) + len(self.reserved)


@dataclass(frozen=True)
class Sample:
    """What the scaler saw at one poll, for charts."""

    time: float
    depth: int
    oldest_age: float
    replicas: int


@dataclass(frozen=True)
class Result:
    scaler: str
    waits: tuple[float, ...]
    worker_seconds: float
    seconds_over_target: float
    timeline: tuple[tuple[float, int], ...]
    samples: tuple[Sample, ...]
    killed_tasks: int
    end: float
    target_wait: float
    early_polls: int = 0  # polls started between two regular ones by a look at the queue
    explanation: str = ""  # the scaler's own account of its decisions

    @property
    def p50(self) -> float:
        return percentile(self.waits, 50)

    @property
    def p95(self) -> float:
        return percentile(self.waits, 95)

    @property
    def max_wait(self) -> float:
        return max(self.waits, default=0.0)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100 * len(ordered)) - 1, 0)
    return ordered[rank]


class Simulation:
    """One run of one scaler over one trace."""

    def __init__(
        self, tasks: Sequence[Task], pool: PoolModel, scaler: Scaler, target_wait: float, horizon: float
    ) -> None:
        self.tasks = sorted(tasks, key=lambda t: t.arrival)
        self.pool, self.scaler, self.target_wait = pool, scaler, target_wait
        self.horizon = horizon
        self.now = 0.0
        self.events: list[tuple[float, int, str, int]] = []
        self.seq = 0
        self.queue: deque[int] = deque()
        self.workers: list[Worker] = []
        self.started: dict[int, float] = {}
        self.arrivals: deque[float] = deque()
        self.completions: deque[tuple[float, float]] = deque()
        self.timeline: list[tuple[float, int]] = []
        self.samples: list[Sample] = []
        self.killed = 0
        self.polls = 0  # polls so far: a poll or check event for an earlier one is stale
        self.early_polls = 0
        self.next_poll = 0.0

    def run(self) -> Result:
        for index, task in enumerate(self.tasks):
            self._at(task.arrival, "arrive", index)
        self._scale_to(self.scaler.initial_replicas())
        self._at(0.0, "poll", self.polls)
        give_up = self.horizon + 24 * 3600  # a scaler that never serves the queue must still end
        while self.events and self.events[0][0] <= give_up:
            self.now, _, kind, item = heapq.heappop(self.events)
            getattr(self, f"_on_{kind}")(item)
        return self._result()

    def _work_left(self) -> bool:
        return self.now < self.horizon or len(self.started) < len(self.tasks) or self._busy()

    # events

    def _on_arrive(self, index: int) -> None:
        self.queue.append(index)
        self.arrivals.append(self.now)
        self._dispatch()

    def _on_ready(self, worker_id: int) -> None:
        self._dispatch()

    def _on_finish(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        for index, finish in list(worker.running.items()):
            if finish <= self.now:
                del worker.running[index]
                self.completions.append((self.now, self.tasks[index].duration))
        self._dispatch()
        if worker.stopping_at is not None and not worker.running:
            self._exit(worker)

    def _on_kill(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        if worker.exited_at is not None:
            return
        for index in sorted(worker.running, reverse=True):
            self.killed += 1
            del self.started[index]
            self.queue.appendleft(index)  # acks_late: redelivered, and it is the oldest message
        worker.running.clear()
        self._exit(worker)
        self._dispatch()

    def _on_poll(self, generation: int) -> None:
        if generation != self.polls:
            return  # an early poll came first
        self.polls += 1
        obs = self._observe()
        self.samples.append(Sample(self.now, obs.backlog or 0, obs.oldest_age_seconds or 0.0, obs.current_replicas))
        self._scale_to(self.scaler.desired(obs))
        if self._work_left():
            self.next_poll = self.now + self.scaler.poll_seconds
            self._at(self.next_poll, "poll", self.polls)
            self._at(self.now + WAKE_CHECK_SECONDS, "check", self.polls)

    def _on_check(self, generation: int) -> None:
        """The loop's look at the queue between polls: a poll now if the scaler wakes on what waits."""
        if generation != self.polls:
            return
        if self.scaler.wakes(len(self.queue)):
            self.early_polls += 1
            self._on_poll(generation)
        elif self.now + WAKE_CHECK_SECONDS < self.next_poll:
            self._at(self.now + WAKE_CHECK_SECONDS, "check", generation)

    # mechanics

    def _at(self, time: float, kind: str, item: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, item))

    def _busy(self) -> bool:
        return any(w.running for w in self.workers)

    def _active(self) -> list[int]:
        return [i for i, w in enumerate(self.workers) if w.stopping_at is None]

    def _dispatch(self) -> None:
        capacity = self.pool.concurrency * self.pool.prefetch_multiplier
        ready = [i for i in self._active() if self.workers[i].ready_at <= self.now]
        while self.queue:
            free = [i for i in ready if self.workers[i].load() < capacity]
            if not free:
                break
            worker_id = min(free, key=lambda i: self.workers[i].load())
            self.workers[worker_id].reserved.append(self.queue.popleft())
            self._start_reserved(worker_id)
        for worker_id in ready:
            self._start_reserved(worker_id)

    def _start_reserved(self, worker_id: int) -> None:
        worker = self.workers[worker_id]
        while worker.reserved and len(worker.running) < self.pool.concurrency:
            index = worker.reserved.popleft()
            self.started[index] = self.now
            finish = self.now + self.tasks[index].duration
            worker.running[index] = finish
            self._at(finish, "finish", worker_id)

    def _scale_to(self, replicas: int) -> None:
        active = self._active()
        for _ in range(replicas - len(active)):
            self.workers.append(Worker(created=self.now, ready_at=self.now + self.pool.startup_seconds))
            self._at(self.now + self.pool.startup_seconds, "ready", len(self.workers) - 1)
        for worker_id in self._victims(active, len(active) - replicas):
            self._stop(worker_id)
        replicas = len(self._active())
        if not self.timeline or self.timeline[-1][1] != replicas:
            self.timeline.append((self.now, replicas))
        self._dispatch()

    def _victims(self, active: list[int], count: int) -> list[int]:
        """Which workers a scale-down removes: pods not ready yet always go first, as in a ReplicaSet."""
        if count <= 0:
            return []
        order = sorted(active, key=lambda i: (self.workers[i].ready_at <= self.now, -self.workers[i].created))
        if self.scaler.removal == "idle_only":
            order = [i for i in order if self.workers[i].load() == 0]
        return order[:count]

    def _stop(self, worker_id: int) -> None:
        """SIGTERM: stop consuming, give back prefetched messages, finish or be killed after the grace period."""
        worker = self.workers[worker_id]
        worker.stopping_at = self.now
        while worker.reserved:
            self.queue.appendleft(worker.reserved.pop())
        if worker.running:
            self._at(self.now + self.pool.grace_seconds, "kill", worker_id)
        else:
            self._exit(worker)

    def _exit(self, worker: Worker) -> None:
        worker.exited_at = self.now

    def _observe(self) -> Observation:
        while self.arrivals and self.arrivals[0] < self.now - RATE_WINDOW:
            self.arrivals.popleft()
        while self.completions and self.completions[0][0] < self.now - SERVICE_WINDOW:
            self.completions.popleft()
        window = min(RATE_WINDOW, self.now) or RATE_WINDOW
        active = [self.workers[i] for i in self._active()]
        oldest = self.now - self.tasks[self.queue[0]].arrival if self.queue else None
        queue = QueueObservation(self.pool.queue, len(self.queue), sum(len(w.reserved) for w in active), oldest)
        return Observation(
            time=self.now,
            current_replicas=len(active),
            queues=(queue,),
            measured_at=self.now,
            arrival_rate=len(self.arrivals) / window,
            arrival_rate_recent=self._recent_arrivals() / (min(RECENT_WINDOW, self.now) or RECENT_WINDOW),
            service_time_mean=statistics.fmean(d for _, d in self.completions) if self.completions else None,
            busy_slots=sum(len(w.running) for w in active),
            live_workers=sum(1 for w in active if w.ready_at <= self.now),
            ready_replicas=sum(1 for w in active if w.ready_at <= self.now),
        )

    def _recent_arrivals(self) -> int:
        return len(self.arrivals) - bisect.bisect_left(self.arrivals, self.now - RECENT_WINDOW)

    def _result(self) -> Result:
        end = max(self.now, self.horizon)
        waits = tuple(self.started.get(i, end) - task.arrival for i, task in enumerate(self.tasks))
        cost = sum((w.exited_at if w.exited_at is not None else end) - w.created for w in self.workers)
        late = [
            (task.arrival + self.target_wait, self.started.get(i, end))
            for i, task in enumerate(self.tasks)
            if self.started.get(i, end) - task.arrival > self.target_wait
        ]
        return Result(
            self.scaler.name,
            waits,
            cost,
            union_length(late),
            tuple(self.timeline),
            tuple(self.samples),
            self.killed,
            end,
            self.target_wait,
            self.early_polls,
            self.scaler.explain(),
        )


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by a set of intervals: the seconds during which some task was over target."""
    total, reach = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= reach:
            continue
        total += stop - max(start, reach)
        reach = stop
    return total


def oracle_worker_seconds(tasks: Sequence[Task], pool: PoolModel, min_replicas: int, end: float) -> float:
    """A lower bound on cost: clairvoyant workers that exist exactly while needed, no wait, no start-up.

    Every task starts on arrival; at each instant the pool holds ceil(running / concurrency) workers
    (never fewer than minReplicas). No real policy can run the same work for less while meeting
    a wait target, short of making tasks wait on purpose.
    """
    changes: list[tuple[float, int]] = []
    for task in tasks:
        changes += [(task.arrival, 1), (task.arrival + task.duration, -1)]
    changes.sort()
    cost, running, last = 0.0, 0, 0.0
    for time, delta in changes:
        cost += max(min_replicas, math.ceil(running / pool.concurrency)) * (min(time, end) - last)
        running, last = running + delta, min(time, end)
    return cost + min_replicas * max(end - last, 0.0)


def simulate(tasks: Sequence[Task], pool: PoolModel, scaler: Scaler, target_wait: float, horizon: float) -> Result:
    """Run one scaler over one trace; cost is counted until `horizon` or the last task, whichever is later."""
    return Simulation(tasks, pool, scaler, target_wait, horizon).run()


# Arrival generators. Each takes a seeded random source so every run of a scenario is the same.

RateFn = Callable[[float], float]
DurationFn = Callable[["_Random"], tuple[str, float]]


class _Random(Protocol):
    def random(self) -> float: ...

    def expovariate(self, lambd: float) -> float: ...


def poisson_arrivals(rate: RateFn, peak: float, horizon: float, duration: DurationFn, rng: _Random) -> list[Task]:
    """A (possibly time-varying) Poisson stream by thinning: rate(t) <= peak everywhere."""
    tasks: list[Task] = []
    now = 0.0
    while True:
        now += rng.expovariate(peak)
        if now >= horizon:
            return tasks
        if rng.random() * peak <= rate(now):
            name, seconds = duration(rng)
            tasks.append(Task(now, seconds, name))


def burst(at: float, count: int, duration: DurationFn, rng: _Random, spread: float = 1.0) -> list[Task]:
    """`count` tasks sent within `spread` seconds: a cron job, a fan-out, a retry storm."""
    tasks = []
    for i in range(count):
        name, seconds = duration(rng)
        tasks.append(Task(at + spread * i / count, seconds, name))
    return tasks


def exponential(mean: float, name: str = "task") -> DurationFn:
    return lambda rng: (name, rng.expovariate(1 / mean))


def mixture(*parts: tuple[float, DurationFn]) -> DurationFn:
    """Durations drawn from several task kinds with the given shares."""
    shares = list(itertools.accumulate(share for share, _ in parts))

    def draw(rng: _Random) -> tuple[str, float]:
        pick = bisect.bisect_left(shares, rng.random() * shares[-1])
        return parts[min(pick, len(parts) - 1)][1](rng)

    return draw


TRACE_SPAN_LIMIT = 7 * 86400.0  # a week of polls simulates in seconds; more is not a trace but a typo
TASK_DURATION_LIMIT = 604800.0  # taskDurationSeconds' bound


def parse_trace(lines: Iterable[str]) -> list[Task]:
    """Tasks from CSV rows `timestamp,task,duration` (seconds; a header row is allowed).

    Timestamps may be epoch seconds or relative; the trace is shifted to start at 0. A ValueError
    names the first bad row by its line number in the file.
    """
    rows = [(number, row) for number, row in enumerate(csv.reader(lines), start=1) if _is_data(row)]
    if rows and not _is_number(rows[0][1][0]):
        rows = rows[1:]
    if not rows:
        raise ValueError("the trace holds no tasks: expected rows of `timestamp,task,duration` in seconds")
    tasks = []
    for number, row in rows:
        if len(row) != 3 or not _is_number(row[0]) or not _is_number(row[2]):
            raise ValueError(f"line {number}: expected `timestamp,task,duration` in seconds, got {','.join(row)!r}")
        if not 0 <= float(row[2]) <= TASK_DURATION_LIMIT:
            raise ValueError(f"line {number}: a duration lies between 0 and {TASK_DURATION_LIMIT:g} s, not {row[2]}")
        tasks.append(Task(float(row[0]), float(row[2]), row[1].strip()))
    start = min(t.arrival for t in tasks)
    if max(t.arrival for t in tasks) - start > TRACE_SPAN_LIMIT:
        raise ValueError(f"the trace spans more than {TRACE_SPAN_LIMIT / 86400:g} days: are the timestamps seconds?")
    return [Task(t.arrival - start, t.duration, t.name) for t in tasks]


def _is_data(row: list[str]) -> bool:
    return bool(row) and any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
