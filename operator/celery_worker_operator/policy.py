"""The capacity policy: measurements in, a replica count and its reasons out. Pure: no I/O.

It reads like the HPA's replica calculator, with Celery's own numbers in place of CPU:

    slots    = arrival_rate x service_time / targetUtilization      (Little's law, steady state)
             + (depth + reserved) x service_time / targetWaitSeconds (drain the backlog in time)
    replicas = ceil(slots / concurrency)

then a tolerance band, min/max, the HPA's stabilization windows (lowest recent recommendation
bounds a scale-up, highest bounds a scale-down) and per-poll step limits. Missing or stale
measurements never shrink a pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .spec import AutoscalingSpec

TOLERANCE = 0.1  # as the HPA: within 10 % of the current size, stay
EPSILON = 1e-9  # keeps ceil(2.0000000001) from becoming 3 after float arithmetic
Number = int | float | str


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
    arrival_rate: float | None = None  # tasks per second
    service_time_mean: float | None = None  # seconds
    service_time_p95: float | None = None
    busy_slots: int | None = None
    live_workers: int | None = None
    ready_replicas: int | None = None

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
class Decision:
    replicas: int
    reason: str
    recommendation: int  # before stabilization and step limits: what the history records
    terms: dict[str, Number] = field(default_factory=dict)


def stale_after(spec: AutoscalingSpec) -> float:
    """Broker numbers older than three polls are not trusted to shrink a pool."""
    return 3 * spec.poll_seconds


def decide(
    obs: Observation, spec: AutoscalingSpec, concurrency: int, history: Sequence[Recommendation] = ()
) -> Decision:
    """The replica count for one pool now, with the numbers and a one-line reason."""
    current = obs.current_replicas
    if not spec.enabled:
        return Decision(current, "autoscaling is disabled: replicas are left as they are", current)
    backlog = obs.backlog
    if backlog is None or obs.measured_at is None or obs.time - obs.measured_at > stale_after(spec):
        return _hold(obs, spec)
    raw, terms, why = _recommend(obs, backlog, spec, concurrency)
    recommendation = _clamp(raw, spec)
    stabilized = _stabilize(current, recommendation, obs.time, spec, history)
    replicas = _clamp(_limit_step(current, stabilized, spec), spec)
    if current == 0 and backlog > 0:
        replicas = max(replicas, 1)  # activation from zero never waits for a window
    terms.update(recommendation=recommendation, stabilized=stabilized, current=current, replicas=replicas)
    return Decision(replicas, _explain(current, replicas, recommendation, stabilized, why), recommendation, terms)


def plan(arrival_rate: float, service_time: float, backlog: int, spec: AutoscalingSpec, concurrency: int) -> Decision:
    """What the formula asks for, from scratch, given these numbers: for `plan`, `demo` and docs."""
    obs = Observation(
        time=0.0,
        current_replicas=0,
        queues=(QueueObservation("planned", backlog),),
        measured_at=0.0,
        arrival_rate=arrival_rate,
        service_time_mean=service_time,
        busy_slots=0,
    )
    return decide(obs, spec, concurrency)


def remember(
    history: Sequence[Recommendation], decision: Decision, now: float, spec: AutoscalingSpec
) -> tuple[Recommendation, ...]:
    """History with this decision added and entries older than both windows dropped."""
    keep = max(spec.scale_up.stabilization_seconds, spec.scale_down.stabilization_seconds)
    kept = [r for r in history if now - r.time <= keep]
    return (*kept, Recommendation(now, decision.recommendation))


def _hold(obs: Observation, spec: AutoscalingSpec) -> Decision:
    """No trustworthy broker numbers: never shrink below current (maxReplicas still binds).

    fallbackReplicas, when set and higher, is where the pool goes while it is blind.
    """
    current = obs.current_replicas
    what = "broker numbers missing" if obs.measured_at is None or obs.backlog is None else "broker numbers stale"
    terms: dict[str, Number] = {"current": current}
    replicas = current
    if spec.fallback_replicas is not None:
        replicas = max(current, spec.fallback_replicas)
        terms["fallback_replicas"] = spec.fallback_replicas
    replicas = _clamp(replicas, spec)
    fallback = f" (fallbackReplicas {spec.fallback_replicas})" if spec.fallback_replicas is not None else ""
    return Decision(replicas, f"{what}: holding {replicas} replicas{fallback}", current, terms)


def _recommend(
    obs: Observation, backlog: int, spec: AutoscalingSpec, concurrency: int
) -> tuple[int, dict[str, Number], str]:
    """The unclamped replica count from the capacity formula, or from queue length without a duration."""
    service_time, source = _service_time(obs, spec)
    busy = obs.busy_slots or 0
    terms: dict[str, Number] = {"backlog": backlog, "busy_slots": busy, "concurrency": concurrency}
    if service_time is None:
        slots = max(backlog + busy, 0) / spec.target_utilization
        why = f"{backlog} waiting + {busy} running, no task duration known (set taskDurationSeconds)"
    else:
        arrival = obs.arrival_rate or 0.0
        offered = max(arrival * service_time, busy)  # Little's law: L = lambda x W
        steady = offered / spec.target_utilization
        drain = backlog * service_time / spec.target_wait_seconds
        slots = steady + drain
        terms.update(
            arrival_rate=arrival,
            service_time=service_time,
            service_time_source=source,
            offered_load=offered,
            steady_slots=steady,
            backlog_slots=drain,
        )
        why = f"{arrival:.3g}/s x {service_time:.3g}s {source} + {backlog} waiting -> {slots:.3g} slots"
    terms["slots"] = slots
    raw = math.ceil(slots / concurrency - EPSILON)
    current = obs.current_replicas
    if current > 0 and abs(slots / concurrency / current - 1) <= TOLERANCE:
        raw = current
    if raw == 0 and (backlog > 0 or busy > 0 or (obs.busy_slots is None and current > 0)):
        raw = 1  # a task waits or runs, or we cannot tell: keep one worker
    return raw, terms, why


def _service_time(obs: Observation, spec: AutoscalingSpec) -> tuple[float | None, str]:
    if obs.service_time_mean is not None and obs.service_time_mean > 0:
        return obs.service_time_mean, "measured"
    if spec.task_duration_seconds is not None:
        return spec.task_duration_seconds, "(taskDurationSeconds)"
    return None, "unknown"


def _clamp(replicas: int, spec: AutoscalingSpec) -> int:
    return min(max(replicas, spec.min_replicas), spec.max_replicas)


def _stabilize(
    current: int, recommendation: int, now: float, spec: AutoscalingSpec, history: Sequence[Recommendation]
) -> int:
    """HPA semantics: grow to the lowest recommendation of the up window, shrink to the highest of the down one."""
    up_window = [r.replicas for r in history if now - r.time < spec.scale_up.stabilization_seconds]
    down_window = [r.replicas for r in history if now - r.time < spec.scale_down.stabilization_seconds]
    up_bound = min([*up_window, recommendation])
    down_bound = max([*down_window, recommendation])
    return min(max(current, up_bound), down_bound)


def _limit_step(current: int, desired: int, spec: AutoscalingSpec) -> int:
    """At most maxStepPods or maxStepPercent of current per poll, whichever allows more."""
    if desired > current:
        step = max(spec.scale_up.max_step_pods, math.ceil(current * spec.scale_up.max_step_percent / 100))
        return min(desired, current + step)
    step = max(spec.scale_down.max_step_pods, math.floor(current * spec.scale_down.max_step_percent / 100))
    return max(desired, current - step)


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
