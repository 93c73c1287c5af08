"""The capacity policy: measurements in, a replica count and its reasons out. Pure: no I/O.

It reads like the HPA's replica calculator, with Celery's own numbers in place of CPU:

    slots    = max(arrival_rate x service_time / targetUtilization,   (Little's law, steady state)
                   busy_slots)                                        (never below what runs now)
             + (depth + reserved) x service_time / drain_seconds      (drain the backlog in time)
    drain_seconds = targetWaitSeconds - oldest task's wait
                    - start-up (only when the pool must grow), at least half the target
    replicas = ceil(slots / concurrency)

The arrival rate is the lower of a recent one (seconds) and the windowed one (a minute), so a
burst, which the backlog term already drains, does not size the steady term for a minute after it
was served. The backlog drains within what is left of the target wait for its oldest task, so a
burst found late asks for more; when that needs new workers, within what is left after they start
(workerStartupSeconds, else the start-up measured on the pool's own new workers), so a burst gets
all the workers it needs in one step rather than too few at once and the rest a poll later. Then a
tolerance band, min/max, the HPA's stabilization windows (lowest recent recommendation bounds a
scale-up, highest bounds a scale-down) and per-poll step limits; workers measured idle while
nothing waits may all go in one step. Missing or stale measurements never shrink a pool. Between
polls the loop looks at the queues (`wakes_early`) and starts a pass as soon as more messages are
ready than the pool has slots and than its last pass saw waiting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from .spec import PAUSED_ANNOTATION, PAUSED_REPLICAS_ANNOTATION, AutoscalingSpec, CeleryWorkerPool

TOLERANCE = 0.1  # as the HPA: within 10 % of the current size, stay
# How often a pool loop looks at its queues between passes (wakes_early); the shared probe's numbers are this fresh.
WAKE_CHECK_SECONDS = 1.0
MIN_DRAIN_SHARE = 0.5  # the backlog drains within at least this share of targetWaitSeconds
EPSILON = 1e-9  # keeps ceil(2.0000000001) from becoming 3 after float arithmetic


class DecisionKind(StrEnum):
    """What a decision does and which term drove it; metrics, Events and the CLI read this."""

    FROM_ZERO = "FromZero"  # a pool at zero gets work: activation, never delayed by a window
    TO_ZERO = "ToZero"  # nothing waits or runs: the pool goes to zero
    BACKLOG = "Backlog"  # draining what waits drives the count
    STEADY = "Steady"  # the arrival rate x service time drives the count
    HOLD = "Hold"  # the count stays (tolerance, windows, limits, or the formula agrees)
    BLIND = "Blind"  # no trustworthy broker numbers: never shrink
    FALLBACK = "Fallback"  # blind, with fallbackReplicas set
    DISABLED = "Disabled"  # autoscaling is off: spec.replicas, or as they are
    PAUSED = "Paused"  # the paused annotation holds the count (or sets paused-replicas)


class Limit(StrEnum):
    """What bound the count, named as the HPA names its ScalingLimited reasons."""

    WITHIN_RANGE = "DesiredWithinRange"
    TOO_FEW = "TooFewReplicas"  # minReplicas raised it
    TOO_MANY = "TooManyReplicas"  # maxReplicas lowered it
    TOO_MANY_TASKS = "TooManyTasks"  # maxConcurrentTasks / concurrency lowered it (below maxReplicas)
    UP_STABILIZED = "ScaleUpStabilized"  # the up window holds a lower count
    DOWN_STABILIZED = "ScaleDownStabilized"  # the down window holds a higher count
    UP_STEP = "ScaleUpLimit"  # maxStepPods / maxStepPercent per poll
    DOWN_STEP = "ScaleDownLimit"


@dataclass(frozen=True)
class QueueObservation:
    """One queue as the broker probe saw it; None means it could not be measured."""

    name: str
    depth: int | None
    reserved: int | None = 0
    oldest_age_seconds: float | None = None


@dataclass(frozen=True)
class Observation:
    """Everything measured about one pool at one moment; any measurement may be missing."""

    time: float
    current_replicas: int
    queues: tuple[QueueObservation, ...] = ()
    measured_at: float | None = None  # when the broker numbers were taken; None: never
    arrival_rate: float | None = None  # tasks per second over the telemetry window (a minute)
    arrival_rate_recent: float | None = None  # tasks per second over the last few seconds
    service_time_mean: float | None = None  # seconds
    service_time_p95: float | None = None
    busy_slots: int | None = None
    live_workers: int | None = None
    ready_replicas: int | None = None
    worker_startup: float | None = None  # seconds a new worker of this pool took to its first event (startup.py)

    @property
    def backlog(self) -> int | None:
        """Tasks waiting for a slot: in the queue or prefetched by a busy worker."""
        if not self.queues or any(q.depth is None for q in self.queues):
            return None
        return sum((q.depth or 0) + (q.reserved or 0) for q in self.queues)

    @property
    def oldest_age_seconds(self) -> float | None:
        ages = [q.oldest_age_seconds for q in self.queues if q.oldest_age_seconds is not None]
        return max(ages) if ages else None


@dataclass(frozen=True)
class Recommendation:
    """A past unstabilized recommendation, kept for the stabilization windows."""

    time: float
    replicas: int


@dataclass(frozen=True)
class Terms:
    """The numbers behind a decision, for Events, `plan` and `simulate`; None where a term took no part.

    slots = steady_slots + backlog_slots; steady_slots = max(offered_load / targetUtilization,
    busy_slots); offered_load = arrival_rate x service_time, where arrival_rate is the lower of
    the recent and the windowed rate (`rate_source` says which); backlog_slots = backlog x
    service_time / drain_seconds, where drain_seconds is targetWaitSeconds less `oldest_wait`
    (the oldest waiting task's age, when known) and, when the pool must grow, less `startup` (what a
    new worker takes before its first task: workerStartupSeconds when set, else the pool's measured
    start-up; `startup_source` says which), never below half the target.
    Without a service time, slots = (backlog + busy) / utilization.
    `idle_workers` is how many workers' worth of slots stood idle with nothing waiting: the
    scale-down step may remove that many at once.
    """

    current: int
    replicas: int = 0
    recommendation: int = 0
    stabilized: int | None = None
    backlog: int | None = None
    busy_slots: int | None = None
    concurrency: int | None = None
    arrival_rate: float | None = None
    rate_source: str | None = None
    service_time: float | None = None
    service_time_source: str | None = None
    offered_load: float | None = None
    steady_slots: float | None = None
    backlog_slots: float | None = None
    oldest_wait: float | None = None
    startup: float | None = None
    startup_source: str | None = None
    drain_seconds: float | None = None
    slots: float | None = None
    fallback_replicas: int | None = None
    idle_workers: int | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    kind: DecisionKind
    limit: Limit
    reason: str  # one line for a person: the Event message
    recommendation: int  # before stabilization and step limits: what the history records
    terms: Terms


def stale_after(spec: AutoscalingSpec) -> float:
    """Broker numbers older than three polls are not trusted to shrink a pool."""
    return 3 * spec.poll_seconds


def decide(
    obs: Observation, spec: AutoscalingSpec, concurrency: int, history: Sequence[Recommendation] = ()
) -> Decision:
    """The replica count for one pool now, with the numbers and a one-line reason."""
    current = obs.current_replicas
    if not spec.enabled:
        reason = "autoscaling is disabled: replicas are left as they are"
        terms = Terms(current, current, current)
        return Decision(current, DecisionKind.DISABLED, Limit.WITHIN_RANGE, reason, current, terms)
    backlog = obs.backlog
    if backlog is None or obs.measured_at is None or obs.time - obs.measured_at > stale_after(spec):
        return _hold(obs, spec, concurrency)
    raw, terms, why = _recommend(obs, backlog, spec, concurrency)
    recommendation, limit = _clamp_why(raw, spec, concurrency, Limit.WITHIN_RANGE)
    stabilized = _stabilize(current, recommendation, obs.time, spec, history)
    if stabilized != recommendation:
        limit = Limit.UP_STABILIZED if stabilized < recommendation else Limit.DOWN_STABILIZED
    idle = _idle_workers(obs, backlog, concurrency)
    stepped = _limit_step(current, stabilized, spec, idle)
    if stepped != stabilized:
        limit = Limit.UP_STEP if stepped < stabilized else Limit.DOWN_STEP
    replicas, limit = _clamp_why(stepped, spec, concurrency, limit)
    if current == 0 and backlog > 0:
        replicas = max(replicas, 1)  # activation from zero never waits for a window
    terms = replace(terms, recommendation=recommendation, stabilized=stabilized, replicas=replicas, idle_workers=idle)
    kind = _kind(current, replicas, terms)
    why += _cap_note(limit, spec, concurrency)
    return Decision(
        replicas, kind, limit, _explain(current, replicas, recommendation, stabilized, why), recommendation, terms
    )


def plan(
    arrival_rate: float,
    service_time: float,
    backlog: int,
    spec: AutoscalingSpec,
    concurrency: int,
    recent_rate: float | None = None,
    oldest_wait: float | None = None,
) -> Decision:
    """What the formula asks for, from scratch, given these numbers: for `plan`, `demo` and docs."""
    obs = Observation(
        time=0.0,
        current_replicas=0,
        queues=(QueueObservation("planned", backlog, oldest_age_seconds=oldest_wait),),
        measured_at=0.0,
        arrival_rate=arrival_rate,
        arrival_rate_recent=recent_rate,
        service_time_mean=service_time,
        busy_slots=0,
    )
    return decide(obs, spec, concurrency)


def wakes_early(waiting: int, last: Decision, spec: AutoscalingSpec) -> bool:
    """Whether a look at the queues between polls (`waiting` ready messages) should start a pass now.

    Yes when the pool may grow and more messages are ready than it has slots (every prefetch buffer
    is full) and than its last pass saw waiting. A burst would otherwise wait up to pollSeconds
    for the next pass, on an idle pool as on one serving a steady load, and a pass that saw half
    a burst land would size the pool for half of it. A backlog that only drains never wakes it,
    and a pass held back by the step limit or the up window waits for its poll: those are per poll.
    """
    concurrency = last.terms.concurrency
    if not spec.enabled or concurrency is None or last.limit in (Limit.UP_STEP, Limit.UP_STABILIZED):
        return False
    ceiling = min(spec.max_replicas, task_ceiling(spec, concurrency) or spec.max_replicas)
    seen = last.terms.backlog or 0
    return last.replicas < ceiling and waiting > max(last.replicas * concurrency, seen)


def remember(
    history: Sequence[Recommendation], decision: Decision, now: float, spec: AutoscalingSpec
) -> tuple[Recommendation, ...]:
    """History with this decision added and entries older than both windows dropped."""
    keep = max(spec.scale_up.stabilization_seconds, spec.scale_down.stabilization_seconds)
    kept = [r for r in history if now - r.time <= keep]
    return (*kept, Recommendation(now, decision.recommendation))


def _hold(obs: Observation, spec: AutoscalingSpec, concurrency: int) -> Decision:
    """No trustworthy broker numbers: never shrink below current (maxReplicas still binds).

    fallbackReplicas, when set and higher, is where the pool goes while it is blind.
    """
    current = obs.current_replicas
    what = "broker numbers missing" if obs.measured_at is None or obs.backlog is None else "broker numbers stale"
    fallback = spec.fallback_replicas
    held = current if fallback is None else max(current, fallback)
    replicas, limit = _clamp_why(held, spec, concurrency, Limit.WITHIN_RANGE)
    terms = Terms(current, replicas, current, fallback_replicas=fallback)
    kind = _crossing_zero(current, replicas) or (DecisionKind.BLIND if fallback is None else DecisionKind.FALLBACK)
    said = f" (fallbackReplicas {fallback})" if fallback is not None else ""
    said += _cap_note(limit, spec, concurrency)
    return Decision(replicas, kind, limit, f"{what}: holding {replicas} replicas{said}", current, terms)


def _recommend(obs: Observation, backlog: int, spec: AutoscalingSpec, concurrency: int) -> tuple[int, Terms, str]:
    """The unclamped replica count from the capacity formula, or from queue length without a duration."""
    service_time, source = _service_time(obs, spec)
    busy = obs.busy_slots or 0
    terms = Terms(obs.current_replicas, backlog=backlog, busy_slots=busy, concurrency=concurrency)
    if service_time is None:
        slots = max(backlog + busy, 0) / spec.target_utilization
        why = f"{backlog} waiting + {busy} running, no task duration known (set taskDurationSeconds)"
    else:
        arrival, rate_source = _ongoing_rate(obs)
        offered = arrival * service_time  # Little's law: L = lambda x W
        steady = max(offered / spec.target_utilization, busy)
        oldest, within = _drain_seconds(obs, spec)
        startup, startup_source = None, None
        if _grows(steady + backlog * service_time / within, concurrency, obs.current_replicas) and backlog:
            startup, startup_source = _startup(obs, spec)
            oldest, within = _drain_seconds(obs, spec, startup or 0.0)
        drain = backlog * service_time / within
        slots = steady + drain
        terms = replace(
            terms,
            arrival_rate=arrival,
            rate_source=rate_source,
            service_time=service_time,
            service_time_source=source,
            offered_load=offered,
            steady_slots=steady,
            backlog_slots=drain,
            oldest_wait=oldest,
            startup=startup,
            startup_source=startup_source,
            drain_seconds=within,
        )
        waiting = f"{backlog} waiting" + (f" (oldest {oldest:.3g}s)" if backlog and oldest else "")
        if backlog and (oldest or startup):
            started = f" (new workers start in {startup:.3g}s, {startup_source})" if startup else ""
            waiting += f" within {within:.3g}s{started}"
        why = f"{arrival:.3g}/s ({rate_source}) x {service_time:.3g}s {source} + {waiting} -> {slots:.3g} slots"
    terms = replace(terms, slots=slots)
    raw = math.ceil(slots / concurrency - EPSILON)
    current = obs.current_replicas
    if current > 0 and abs(slots / concurrency / current - 1) <= TOLERANCE:
        raw = current
    if raw == 0 and (backlog > 0 or busy > 0 or (obs.busy_slots is None and current > 0)):
        raw = 1  # a task waits or runs, or we cannot tell: keep one worker
    return raw, terms, why


def _drain_seconds(obs: Observation, spec: AutoscalingSpec, startup: float = 0.0) -> tuple[float | None, float]:
    """The oldest waiting task's age (None when unknown) and the seconds the backlog has to drain.

    What the oldest task already waited is gone from its target, and so is a new worker's start-up
    when the backlog needs new workers; the floor at half the target keeps a task found long after
    its deadline (or workers slower to start than the target) from asking for every worker at once.
    """
    target, oldest = spec.target_wait_seconds, obs.oldest_age_seconds
    if not obs.backlog or (oldest is None and not startup):
        return oldest, target
    return oldest, max(target - (oldest or 0.0) - startup, target * MIN_DRAIN_SHARE)


def _startup(obs: Observation, spec: AutoscalingSpec) -> tuple[float | None, str | None]:
    """What a new worker takes before its first task, and where that comes from (None: not known,
    counted as 0). An explicit workerStartupSeconds wins, 0 too; else the pool's measured start-up."""
    if spec.worker_startup_seconds is not None:
        return spec.worker_startup_seconds or None, "workerStartupSeconds"
    if obs.worker_startup is not None:
        return obs.worker_startup, "measured"
    return None, None


def _grows(slots: float, concurrency: int, current: int) -> bool:
    """Whether `slots` need more workers than the pool has, beyond the tolerance band."""
    return slots / concurrency > current * (1 + TOLERANCE)


def _service_time(obs: Observation, spec: AutoscalingSpec) -> tuple[float | None, str]:
    if obs.service_time_mean is not None and obs.service_time_mean > 0:
        return obs.service_time_mean, "measured"
    if spec.task_duration_seconds is not None:
        return spec.task_duration_seconds, "(taskDurationSeconds)"
    return None, "unknown"


def task_ceiling(spec: AutoscalingSpec, concurrency: int) -> int | None:
    """The most replicas whose slots stay within maxConcurrentTasks, or None without that cap."""
    if spec.max_concurrent_tasks is None:
        return None
    return spec.max_concurrent_tasks // concurrency


def _clamp_why(replicas: int, spec: AutoscalingSpec, concurrency: int, limit: Limit) -> tuple[int, Limit]:
    """Within min/max and maxConcurrentTasks; the limit names the bound when one applied, else stays as given.

    The task cap wins over minReplicas: it protects something outside the pool (a database's
    connections), which a floor set for latency must not overrun.
    """
    if replicas < spec.min_replicas:
        replicas, limit = spec.min_replicas, Limit.TOO_FEW
    elif replicas > spec.max_replicas:
        replicas, limit = spec.max_replicas, Limit.TOO_MANY
    ceiling = task_ceiling(spec, concurrency)
    if ceiling is not None and replicas > ceiling:
        return ceiling, Limit.TOO_MANY_TASKS
    return replicas, limit


def _cap_note(limit: Limit, spec: AutoscalingSpec, concurrency: int) -> str:
    """The words that say maxConcurrentTasks bound the count, for the reason line and the Event."""
    if limit is not Limit.TOO_MANY_TASKS:
        return ""
    ceiling = task_ceiling(spec, concurrency)
    return f"; maxConcurrentTasks {spec.max_concurrent_tasks} / concurrency {concurrency} caps at {ceiling}"


def _crossing_zero(current: int, replicas: int) -> DecisionKind | None:
    if current == 0 < replicas:
        return DecisionKind.FROM_ZERO
    if replicas == 0 < current:
        return DecisionKind.TO_ZERO
    return None


def _kind(current: int, replicas: int, terms: Terms) -> DecisionKind:
    """Which move this is, and which term of the formula drove it."""
    crossing = _crossing_zero(current, replicas)
    if crossing is not None:
        return crossing
    if replicas == current:
        return DecisionKind.HOLD
    if terms.service_time is None:
        return DecisionKind.BACKLOG if terms.backlog else DecisionKind.STEADY
    return DecisionKind.BACKLOG if (terms.backlog_slots or 0) > (terms.steady_slots or 0) else DecisionKind.STEADY


def _stabilize(
    current: int, recommendation: int, now: float, spec: AutoscalingSpec, history: Sequence[Recommendation]
) -> int:
    """HPA semantics: grow to the lowest recommendation of the up window, shrink to the highest of the down one."""
    up_window = [r.replicas for r in history if now - r.time < spec.scale_up.stabilization_seconds]
    down_window = [r.replicas for r in history if now - r.time < spec.scale_down.stabilization_seconds]
    up_bound = min([*up_window, recommendation])
    down_bound = max([*down_window, recommendation])
    return min(max(current, up_bound), down_bound)


def _limit_step(current: int, desired: int, spec: AutoscalingSpec, idle_workers: int = 0) -> int:
    """At most maxStepPods or maxStepPercent of current per poll, whichever allows more.

    On the way down, workers' worth of slots measured idle with nothing waiting may all go at once:
    the step limit guards against removing work in progress, and idle slots hold none.
    """
    if desired > current:
        step = max(spec.scale_up.max_step_pods, math.ceil(current * spec.scale_up.max_step_percent / 100))
        return min(desired, current + step)
    step = max(spec.scale_down.max_step_pods, math.floor(current * spec.scale_down.max_step_percent / 100))
    return max(desired, current - max(step, idle_workers))


def _idle_workers(obs: Observation, backlog: int, concurrency: int) -> int:
    """Whole workers' worth of measured idle slots while nothing waits; 0 when unmeasured."""
    if backlog > 0 or obs.busy_slots is None:
        return 0
    return max(obs.current_replicas * concurrency - obs.busy_slots, 0) // concurrency


def _explain(current: int, replicas: int, recommendation: int, stabilized: int, why: str) -> str:
    if replicas > current:
        verb = f"scale up {current} -> {replicas}"
    elif replicas < current:
        verb = f"scale down {current} -> {replicas}"
    else:
        verb = f"hold {current}"
    limits = []
    if stabilized != recommendation:
        limits.append(f"stabilization window keeps {stabilized}")
    if replicas != stabilized:
        limits.append("step limit")
    suffix = f"; wanted {recommendation}, " + ", ".join(limits) if limits else ""
    return f"{verb}: {why}{suffix}"


def _ongoing_rate(obs: Observation) -> tuple[float, str]:
    """The arrival rate the steady term sizes for, and which estimator gave it.

    A burst fills the recent rate first and leaves it first, while it lingers in the minute-long
    one for a minute after it was served; a lasting change shows in both. The lower of the two is
    the rate that keeps coming; what it misses waits in the queue, where the backlog term sees it.
    """
    long, recent = obs.arrival_rate, obs.arrival_rate_recent
    if recent is None:
        return long or 0.0, "window"
    if long is None or recent <= long:
        return recent, "recent"
    return long, "window"


class Mode(StrEnum):
    """Who moves a pool's replicas and whether limits are broadcast; `status.mode` shows it."""

    AUTO = "Auto"  # the policy scales, limits and routing are broadcast
    RECOMMEND = "Recommend"  # autoscaling.mode recommend: decide and tell, never scale nor broadcast
    PAUSED = "Paused"  # the paused annotation: nothing moves (or paused-replicas, set and held)
    MANUAL = "Manual"  # autoscaling disabled: spec.replicas is applied, limits are broadcast


@dataclass(frozen=True)
class Steering:
    """A pool's mode, the count it pins (spec.replicas when Manual, paused-replicas when Paused),
    and what is wrong with the annotations, if anything, in words."""

    mode: Mode
    replicas: int | None = None
    problem: str = ""

    @property
    def scales(self) -> bool:
        """Whether the workload's replicas may be changed at all."""
        return self.mode in (Mode.AUTO, Mode.MANUAL) or (self.mode is Mode.PAUSED and self.replicas is not None)

    @property
    def broadcasts(self) -> bool:
        """Whether limits and routing are sent to the workers."""
        return self.mode in (Mode.AUTO, Mode.MANUAL)


def steering(pool: CeleryWorkerPool) -> Steering:
    """The mode of `pool`: the paused annotation wins over everything, then a disabled autoscaler,
    then autoscaling.mode. A paused-replicas value that is not a whole number >= 0 pauses at the
    current count, and `problem` says so."""
    annotations = pool.metadata.annotations
    if annotations.get(PAUSED_ANNOTATION, "").strip().lower() == "true":
        pinned = annotations.get(PAUSED_REPLICAS_ANNOTATION)
        if pinned is None:
            return Steering(Mode.PAUSED)
        if pinned.strip().isdigit():
            return Steering(Mode.PAUSED, int(pinned))
        problem = f"{PAUSED_REPLICAS_ANNOTATION} {pinned!r} is not a whole number >= 0: replicas are held as they are"
        return Steering(Mode.PAUSED, problem=problem)
    if not pool.spec.autoscaling.enabled:
        return Steering(Mode.MANUAL, pool.spec.replicas)
    return Steering(Mode.RECOMMEND if pool.spec.autoscaling.mode == "recommend" else Mode.AUTO)


def steer(decision: Decision, steering: Steering) -> Decision:
    """The policy's decision as the mode lets it stand: Manual and Paused pin the count they name
    (or hold the current one); Auto and Recommend keep the policy's (Recommend only reports it)."""
    if steering.mode in (Mode.AUTO, Mode.RECOMMEND):
        return decision
    current = decision.terms.current
    replicas = current if steering.replicas is None else steering.replicas
    if steering.mode is Mode.MANUAL:
        kind = DecisionKind.DISABLED
        why = "autoscaling is disabled: " + (
            f"spec.replicas is {replicas}" if steering.replicas is not None else "replicas are left as they are"
        )
    else:
        kind = DecisionKind.PAUSED
        why = f"paused ({PAUSED_ANNOTATION}): " + (
            f"{PAUSED_REPLICAS_ANNOTATION} is {replicas}" if steering.replicas is not None else "replicas are held"
        )
    verb = "hold" if replicas == current else f"scale {'up' if replicas > current else 'down'} {current} ->"
    reason = f"{verb} {replicas}: {why}"
    return Decision(
        replicas, kind, Limit.WITHIN_RANGE, reason, decision.recommendation, replace(decision.terms, replicas=replicas)
    )
