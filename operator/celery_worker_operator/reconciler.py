"""One pass of the control loop for one pool: observe -> decide -> act -> report.

It knows nothing of kopf or of where replicas live: the broker probe, the event telemetry, the
workload and the reporter come in through small protocols, so the same pass runs the operator
on Kubernetes and `celery-worker-operator local` on a laptop. What it cannot size (no workload,
no Secret, an invalid spec) the pool loop reports through `Reconciler.blocked`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .advice import AdviceKind, Finding, PoolFacts, advise, settle
from .brokers import BrokerUnavailable, QueueProbe, QueueStats
from .control import WorkerStats
from .naming import member_of
from .policy import (
    Decision,
    Limit,
    Mode,
    Observation,
    QueueObservation,
    Recommendation,
    Steering,
    decide,
    remember,
    steer,
    steering,
)
from .spec import CeleryWorkerPool, CeleryWorkerPoolStatus, Condition, ConditionStatus, LastDecision, QueueStatus
from .startup import StartupSamples
from .telemetry import PoolTelemetry
from .workloads import Workload, WorkloadState, removal_order
from .workloads.command import grace_seconds

log = logging.getLogger(__name__)

Clock = Callable[[], float]
DRAINED = -1  # the load a drained member is marked with: below any idle one
Drainer = Callable[[CeleryWorkerPool, list[str]], list[str]]  # members -> those still busy at the deadline


@dataclass(frozen=True)
class ControlReport:
    """What the latest finished control pass found: the LimitsApplied condition and each worker's health."""

    status: ConditionStatus
    reason: str
    message: str
    workers: Mapping[str, WorkerStats] = field(default_factory=dict)


# (pool, workers it runs or is starting, its members: pods or processes, for legacy worker names)
LimitsConverger = Callable[[CeleryWorkerPool, int, Sequence[str]], ControlReport]


class Telemetry(Protocol):
    def snapshot(self, pool: str, queues: Sequence[str] = (), claim: Collection[str] = ()) -> PoolTelemetry: ...


class Reporter(Protocol):
    """Where a pass's results go: Kubernetes status and Events, or the local terminal."""

    def event(self, type_: str, reason: str, message: str) -> None: ...

    def status(self, status: dict[str, Any]) -> None: ...


@dataclass
class PoolMemory:
    """What one pool's loop carries from pass to pass (rebuilt from status after a restart)."""

    history: tuple[Recommendation, ...] = ()
    last_status: dict[str, Any] | None = None
    conditions: dict[str, Condition] = field(default_factory=dict)
    last_decision: LastDecision | None = None
    capped: bool = False  # maxConcurrentTasks bound the last decision: its Event is sent once per episode
    advice: dict[AdviceKind, tuple[Finding, int]] = field(default_factory=dict)  # findings in force (advice.settle)
    baselines: dict[str, WorkerStats] = field(default_factory=dict)  # each worker's health when first seen
    rate_members: tuple[tuple[float, int], ...] = ()  # (time, workers) over the down window: pool rate splits
    mode: Mode | None = None  # as the last pass found it, for status.mode
    recommended: int | None = None  # the count the last "would scale" Event named (recommend mode)
    startup: StartupSamples = field(default_factory=StartupSamples)  # its new workers' start-ups (not resumed)

    @classmethod
    def resume(cls, status: Mapping[str, Any] | None, now: float) -> PoolMemory:
        """After an operator restart: the last desired count enters the windows as if decided now,
        so a new process whose event history is still empty holds it for a down window instead of
        shrinking on its first pass."""
        memory = cls()
        if not status:
            return memory
        parsed = CeleryWorkerPoolStatus.model_validate(dict(status))
        memory.conditions = {c.type: c for c in parsed.conditions}
        memory.last_decision = parsed.last_decision
        if parsed.desired_replicas is not None:
            memory.history = (Recommendation(now, parsed.desired_replicas),)
        return memory


@dataclass(frozen=True)
class Sources:
    """Where one pass measures and acts: the pool's broker and workload as resolved for this pass."""

    probe: QueueProbe
    telemetry: Telemetry
    workload: Workload
    limits: LimitsConverger | None = None
    drain: Drainer | None = None
    broker_url: str | None = None  # where the control state for this pool is kept, to forget it with the pool


@dataclass(frozen=True)
class Measurements:
    stats: dict[str, QueueStats] | None
    broker_error: str | None
    telemetry: PoolTelemetry | None
    workload: WorkloadState
    startup: float | None = None  # the pool's measured worker start-up, seconds (startup.py)


@dataclass(frozen=True)
class PassResult:
    """What one pass did, for metrics and callers: the decision (None when blocked), the status as
    written, the busy slots measured, the reason the pool could not be sized, if so, and the
    telemetry the pass read."""

    decision: Decision | None
    status: Mapping[str, Any]
    blocked: str | None = None
    telemetry: PoolTelemetry | None = None
    mode: Mode = Mode.AUTO

    @property
    def busy_slots(self) -> int | None:
        """Slots running a task at the pass, from the workers' heartbeats."""
        return self.telemetry.busy_slots if self.telemetry else None


class Reconciler:
    """Runs passes for one pool and remembers what it needs between them. Not thread-safe: one loop per pool."""

    def __init__(
        self, reporter: Reporter, memory: PoolMemory | None = None, clock: Clock = time.time, name: str = ""
    ) -> None:
        self.reporter = reporter
        self.memory = memory or PoolMemory()
        self.clock = clock
        self.name = name  # `namespace/pool`, for log lines

    def _event(self, type_: str, reason: str, message: str) -> None:
        """An Event, and the same line in the log: logs are where people look first, Events expire."""
        log.log(logging.INFO if type_ == "Normal" else logging.WARNING, "pool %s %s: %s", self.name, reason, message)
        self.reporter.event(type_, reason, message)

    def reconcile(self, pool: CeleryWorkerPool, sources: Sources, generation: int | None = None) -> PassResult:
        """One pass; raises WorkloadMissing (from the workload) when there is nothing to size."""
        now = self.clock()
        mode = steering(pool)
        measured = self._measure(pool, sources)
        concurrency = measured.workload.concurrency or 1
        decision = decide(observation(now, measured), pool.spec.autoscaling, concurrency, self.memory.history)
        self.memory.history = remember(self.memory.history, decision, now, pool.spec.autoscaling)
        decision = steer(decision, mode)
        self._note_cap(decision)
        able = self._able_to_scale(measured, generation)
        if mode.mode is Mode.RECOMMEND:
            self._recommend(decision, measured.workload.replicas)
        elif able and decision.replicas != measured.workload.replicas:
            self._act(pool, sources, measured, decision, now)
        self._conditions(measured, now, generation)
        self._mode_condition(mode, now, generation)
        control = None
        if sources.limits and mode.broadcasts:
            expected = self._rate_members(pool, measured, decision, now)
            control = sources.limits(pool, expected, measured.workload.members)
        if control is not None:
            set_condition(
                self.memory, "LimitsApplied", control.status, control.reason, control.message, now, generation
            )
        elif not mode.broadcasts:
            held = f"limits and routing are not broadcast while the pool is {mode.mode.value.lower()}"
            set_condition(self.memory, "LimitsApplied", "Unknown", mode.mode.value, held, now, generation)
        self._advise(pool, sources, measured, control.workers if control else {}, now, generation)
        report(self.memory, self.reporter, measured, decision, generation)
        return PassResult(decision, self.memory.last_status or {}, telemetry=measured.telemetry, mode=mode.mode)

    def applied(self, conflict: str | None, generation: int | None) -> None:
        """How the last apply of the managed Deployment went: `WorkloadApplied`, and one Warning when a
        conflict starts (written with the next pass's status)."""
        self._conflict_condition(
            "WorkloadApplied", conflict, "Applied", "the managed Deployment is applied", generation
        )

    def _able_to_scale(self, measured: Measurements, generation: int | None) -> bool:
        """`AbleToScale`: False while another manager applies the replica count (the pool then never
        scales, where forcing it would fight that manager on every sync)."""
        owners = measured.workload.replicas_declared_by
        conflict = None
        if owners:
            conflict = (
                f"spec.replicas is applied by {', '.join(owners)} as well: the operator does not force it; "
                "remove replicas from that manifest (README, GitOps)"
            )
        self._conflict_condition(
            "AbleToScale", conflict, "ReplicasOwned", "the pool owns its replica count", generation
        )
        return not owners

    def _conflict_condition(
        self, type_: str, conflict: str | None, fine_reason: str, fine: str, generation: int | None
    ) -> None:
        old = self.memory.conditions.get(type_)
        if conflict is None:
            set_condition(self.memory, type_, "True", fine_reason, fine, self.clock(), generation)
            return
        if old is None or old.status != "False" or old.message != conflict:
            self._event("Warning", "FieldConflict", conflict)
        set_condition(self.memory, type_, "False", "FieldConflict", conflict, self.clock(), generation)

    def _recommend(self, decision: Decision, current: int) -> None:
        """Recommend mode: a Normal "would scale" Event each time the recommended count moves, from the
        last recommended count (at first, the current one) to the new one, with the policy's reasons."""
        before = current if self.memory.recommended is None else self.memory.recommended
        if decision.replicas != before:
            up = decision.replicas > before
            why = decision.reason.partition(": ")[2]
            message = f"would scale {'up' if up else 'down'} {before} -> {decision.replicas}: {why}"
            self._event("Normal", "WouldScaleUp" if up else "WouldScaleDown", message)
        self.memory.recommended = decision.replicas

    def _mode_condition(self, mode: Steering, now: float, generation: int | None) -> None:
        """`Paused` (True while the annotation holds the pool) and the mode for `status.mode`."""
        self.memory.mode = mode.mode
        if mode.mode is Mode.PAUSED:
            held = f"replicas set to {mode.replicas} and held" if mode.replicas is not None else "replicas held"
            message = f"paused by annotation: {held}, no limits or routing broadcast; {mode.problem}".rstrip("; ")
            set_condition(self.memory, "Paused", "True", "PausedByAnnotation", message, now, generation)
            return
        running = {
            Mode.AUTO: "the pool is sized and its limits broadcast",
            Mode.RECOMMEND: "recommend only: decisions are reported, never carried out",
            Mode.MANUAL: "autoscaling is disabled: spec.replicas is applied",
        }
        set_condition(self.memory, "Paused", "False", mode.mode.value, running[mode.mode], now, generation)

    def blocked(self, reason: str, message: str, generation: int | None) -> PassResult:
        """The pool cannot be sized (invalid spec, no Secret, no workload): a Warning when this starts, and status."""
        old = self.memory.conditions.get("Ready")
        if old is None or old.status != "False" or old.reason != reason:
            self._event("Warning", reason, message)
        set_condition(self.memory, "Ready", "False", reason, message, self.clock(), generation)
        report(self.memory, self.reporter, None, None, generation)
        return PassResult(None, self.memory.last_status or {}, blocked=reason)

    def _measure(self, pool: CeleryWorkerPool, sources: Sources) -> Measurements:
        workload = sources.workload.observe()
        stats, error = None, None
        try:
            stats = sources.probe.stats(pool.spec.queues)
        except BrokerUnavailable as unavailable:
            error = str(unavailable)
            log.warning("pool %s: %s", pool.metadata.name, error)
        identity = pool.identity
        legacy = identity.legacy_hostnames(workload.members)  # workers whose pods have not rolled yet
        telemetry = sources.telemetry.snapshot(identity.key, pool.spec.queues, legacy)
        self.memory.startup = sample_startup(self.memory.startup, workload, telemetry)
        return Measurements(stats, error, telemetry, workload, self.memory.startup.median)

    def _act(
        self, pool: CeleryWorkerPool, sources: Sources, measured: Measurements, decision: Decision, now: float
    ) -> None:
        current = measured.workload.replicas
        load = member_load(measured.telemetry)
        if decision.replicas < current and pool.spec.autoscaling.scale_down.mode == "drain" and sources.drain:
            load = self._drain(pool, sources.drain, measured.workload, load, current - decision.replicas)
        sources.workload.scale(decision.replicas, load)
        reason = "ScaledUp" if decision.replicas > current else "ScaledDown"
        self._event("Normal", reason, decision.reason)
        self.memory.last_decision = LastDecision(
            time=_utc(now),
            from_=current,
            to=decision.replicas,
            reason=decision.reason,
            kind=decision.kind,
            limit=decision.limit,
        )

    def _advise(
        self,
        pool: CeleryWorkerPool,
        sources: Sources,
        measured: Measurements,
        workers: Mapping[str, WorkerStats],
        now: float,
        generation: int | None,
    ) -> None:
        """The `Advice` condition and one Warning per finding as it starts; never touches the decision."""
        if workers:  # a worker's first numbers are its baseline for as long as it lives
            kept = {w: b for w, b in self.memory.baselines.items() if w in workers}
            self.memory.baselines = {**workers, **kept}
        facts = PoolFacts(
            pool.spec,
            measured.telemetry,
            measured.stats,
            grace_seconds(pool.spec) if pool.spec.worker else None,
            workers=workers,
            baselines=self.memory.baselines,
            broker_url=sources.broker_url,
        )
        self.memory.advice, started = settle(self.memory.advice, advise(facts))
        for finding in started:
            self.reporter.event("Warning", finding.kind.value, str(finding))
        in_force = [finding for finding, _ in self.memory.advice.values()]
        set_condition(self.memory, "Advice", *advice_condition(in_force), now, generation)

    def _rate_members(self, pool: CeleryWorkerPool, measured: Measurements, decision: Decision, now: float) -> int:
        """How many ways pool rates are split: the workers the pool runs or is starting (the new count
        on a scale-up, so the running ones are lowered before the new ones take work), the highest
        over the scale-down window. Shares fall at once and rise late: every change refills each
        worker's token bucket, so a worker restarting within the window (a crash) changes nothing,
        while one gone longer gives its share to the others."""
        workload = measured.workload
        members = decision.replicas if decision.replicas > workload.replicas else workload.ready_replicas
        window = pool.spec.autoscaling.scale_down.stabilization_seconds
        kept = [(at, count) for at, count in self.memory.rate_members if now - at < window]
        self.memory.rate_members = (*kept, (now, members))
        return max(count for _, count in self.memory.rate_members)

    def _note_cap(self, decision: Decision) -> None:
        """One Event when maxConcurrentTasks starts binding, so the user sees the downstream cap at work."""
        capped = decision.limit is Limit.TOO_MANY_TASKS
        if capped and not self.memory.capped:
            self.reporter.event("Normal", Limit.TOO_MANY_TASKS.value, decision.reason)
        self.memory.capped = capped

    def _drain(
        self, pool: CeleryWorkerPool, drain: Drainer, workload: WorkloadState, load: dict[str, int], count: int
    ) -> dict[str, int]:
        """Drain mode: the workers about to go stop consuming and finish what they run first; they
        are then marked cheapest of all, so they are the ones removed."""
        victims = removal_order(workload.members, load)[:count]
        still_busy = drain(pool, victims)
        if still_busy:
            message = f"{', '.join(still_busy)} still busy when the drain timed out; acks_late redelivers their tasks"
            self._event("Warning", "DrainTimeout", message)
        return {**load, **dict.fromkeys(victims, DRAINED)}

    def _conditions(self, measured: Measurements, now: float, generation: int | None) -> None:
        if measured.broker_error is None:
            set_condition(self.memory, "MetricsAvailable", "True", "BrokerMeasured", "queues measured", now, generation)
        else:
            error = measured.broker_error
            set_condition(self.memory, "MetricsAvailable", "False", "BrokerUnavailable", error, now, generation)
        ready = measured.workload.ready_replicas
        message = f"{ready} of {measured.workload.replicas} workers ready"
        set_condition(self.memory, "Ready", "True", "WorkloadFound", message, now, generation)
        if measured.workload.crash_loop is None:
            set_condition(
                self.memory, "WorkersRunning", "True", "NoCrashLoop", "no worker keeps exiting", now, generation
            )
        else:
            crashing = measured.workload.crash_loop
            set_condition(self.memory, "WorkersRunning", "False", "CrashLoopBackOff", crashing, now, generation)


def advice_condition(findings: Sequence[Finding]) -> tuple[ConditionStatus, str, str]:
    """`Advice`: True while the advisor finds something (reason: the kinds, comma-separated; message: a
    line per finding), else False."""
    if not findings:
        return "False", "NoFindings", "nothing in the operations guide's pitfalls applies now"
    return "True", ",".join(f.kind.value for f in findings), "\n".join(str(f) for f in findings)


def set_condition(
    memory: PoolMemory,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: float,
    generation: int | None,
) -> None:
    """KEP-1623: lastTransitionTime moves only when the status does."""
    old = memory.conditions.get(type_)
    since = old.last_transition_time if old is not None and old.status == status else _utc(now)
    memory.conditions[type_] = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def report(
    memory: PoolMemory,
    reporter: Reporter,
    measured: Measurements | None,
    decision: Decision | None,
    generation: int | None,
) -> None:
    """Write status only when it changed: every write wakes every watcher of the pool."""
    status = build_status(measured, decision, memory, generation)
    if status != memory.last_status:
        reporter.status(status)
        memory.last_status = status


def observation(now: float, measured: Measurements) -> Observation:
    """The policy's view of one pass; missing parts stay None so the policy can hold."""
    workload, telemetry = measured.workload, measured.telemetry
    queues: tuple[QueueObservation, ...] = ()
    if measured.stats is not None:
        queues = tuple(
            QueueObservation(s.name, s.depth, s.reserved or 0, s.oldest_age_seconds) for s in measured.stats.values()
        )
    return Observation(
        time=now,
        current_replicas=workload.replicas,
        queues=queues,
        measured_at=now if measured.stats is not None else None,
        arrival_rate=telemetry.arrival_rate if telemetry else None,
        arrival_rate_recent=telemetry.arrival_rate_recent if telemetry else None,
        service_time_mean=telemetry.service_time_mean if telemetry else None,
        service_time_p95=telemetry.service_time_p95 if telemetry else None,
        busy_slots=telemetry.busy_slots if telemetry and telemetry.live_workers else None,
        live_workers=telemetry.live_workers if telemetry else None,
        ready_replicas=workload.ready_replicas,
        worker_startup=measured.startup,
    )


def sample_startup(samples: StartupSamples, workload: WorkloadState, telemetry: PoolTelemetry) -> StartupSamples:
    """`samples` with the start-ups of the members whose workers were first heard since the last pass."""
    first_heard = {
        member_of(hostname): worker.first_heard
        for hostname, worker in telemetry.workers.items()
        if worker.first_heard is not None
    }
    return samples.add(workload.started, first_heard, telemetry.watching_since)


def member_load(telemetry: PoolTelemetry | None) -> dict[str, int]:
    """Busy slots per member (pod or process name), from the workers' heartbeats."""
    if telemetry is None:
        return {}
    return {member_of(hostname): worker.active for hostname, worker in telemetry.workers.items() if worker.online}


def build_status(
    measured: Measurements | None, decision: Decision | None, memory: PoolMemory, generation: int | None
) -> dict[str, Any]:
    """The status subresource, rounded so that noise in rates does not cause a write per poll."""
    status = CeleryWorkerPoolStatus(
        observed_generation=generation,
        mode=memory.mode.value if memory.mode else None,
        conditions=sorted(memory.conditions.values(), key=lambda c: c.type),
        last_decision=memory.last_decision,
    )
    if measured is not None:
        status = status.model_copy(update=_measured_fields(measured, decision))
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _measured_fields(measured: Measurements, decision: Decision | None) -> dict[str, Any]:
    workload, telemetry, stats = measured.workload, measured.telemetry, measured.stats
    fields: dict[str, Any] = {
        "replicas": workload.replicas,
        "ready_replicas": workload.ready_replicas,
        "desired_replicas": decision.replicas if decision else None,
        "selector": workload.selector,
        "worker_startup_seconds": _round(measured.startup),
    }
    if stats is not None:
        fields["queues"] = [
            QueueStatus(
                name=s.name,
                depth=s.depth,
                reserved=s.reserved or 0,
                consumers=s.consumers,
                oldest_age_seconds=_round(s.oldest_age_seconds),
            )
            for s in stats.values()
        ]
        fields["depth"] = sum(s.depth for s in stats.values())
        ages = [s.oldest_age_seconds for s in stats.values() if s.oldest_age_seconds is not None]
        fields["wait_seconds"] = _round(max(ages)) if ages else None
    if telemetry is not None:
        fields["arrival_rate"] = _round(telemetry.arrival_rate)
        fields["service_time_seconds"] = _round(telemetry.service_time_mean)
        fields["workers_online"] = telemetry.live_workers
    return fields


def _round(value: float | None) -> float | None:
    """Two significant digits: enough for people and for `kubectl get`, stable enough to not churn."""
    return None if value is None else float(f"{value:.2g}")


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(microsecond=0)
