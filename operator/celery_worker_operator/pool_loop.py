"""One loop per pool, run by the kopf daemon on Kubernetes and by `local` on a laptop alike.

Each pass it reads the pool (a kopf body or a parsed pool), resolves where to measure and act
(`Sources`: the broker's probe and events, the workload), hands them to the pool's long-lived
`Reconciler`, and records the result in the metrics. Between passes a pool that may still grow
checks its queues' depth every second (one probe call measures all pools of a broker), so a burst
starts a pass at once instead of waiting out pollSeconds. Every reason a pool cannot be sized ends
here, in one place: an invalid spec, a missing Secret, a missing workload. What pools on one
broker share (probe, event monitor, control state) comes from `SharedResources`, one per process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .brokers import BrokerUnavailable, ProbeRegistry, QueueProbe
from .control import ConvergeResult, PoolController, PoolSettings
from .manifests import InvalidPool, parse_pool
from .metrics import PoolMetrics, TimedProbe
from .naming import member_of, worker_hostname
from .policy import WAKE_CHECK_SECONDS, Decision, Mode, wakes_early
from .reconciler import (
    Clock,
    ControlReport,
    Drainer,
    LimitsConverger,
    PassResult,
    PoolMemory,
    Reconciler,
    Reporter,
    Sources,
)
from .secrets import SecretMissing, SecretUnusable
from .spec import AutoscalingSpec, CeleryWorkerPool, TransportOptions
from .telemetry import TelemetryMonitors
from .template_policy import TemplatePolicy
from .workloads import Workload, WorkloadMissing, WorkloadNotOwned
from .workloads.command import grace_seconds

INVALID_SPEC_RETRY_SECONDS = 30.0  # a spec that fails validation is looked at again this often
MAX_DRAIN_SECONDS = 60.0  # a pass waits at most this long for draining workers to finish
POLL_JITTER = 0.1  # each interval is pollSeconds +-10 %: pools started together drift apart, not poll in lockstep
BLOCKED_REASONS: dict[type[Exception], str] = {
    InvalidPool: "InvalidSpec",
    SecretMissing: "SecretMissing",
    SecretUnusable: "SecretUnusable",
    WorkloadMissing: "WorkloadMissing",
    WorkloadNotOwned: "WorkloadNotOwned",
}

SourcesFor = Callable[[CeleryWorkerPool], Sources]  # raises SecretMissing or WorkloadMissing when it cannot


class Stopping(Protocol):
    """kopf's DaemonStopped and threading.Event both answer this."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> object: ...


@dataclass
class SharedResources:
    """What every pool of one process shares: per broker URL one probe, one event monitor and the
    control state; and the process's metrics."""

    probes: ProbeRegistry = field(default_factory=ProbeRegistry)
    telemetry: TelemetryMonitors = field(default_factory=TelemetryMonitors)
    controller: PoolController = field(default_factory=PoolController)
    metrics: PoolMetrics = field(default_factory=PoolMetrics)

    def sources(
        self,
        namespace: str,
        name: str,
        broker: tuple[str, str | None],
        workload: Workload,
        transport_options: TransportOptions | None = None,
    ) -> Sources:
        """A pass's sources for pool `namespace/name` on `broker` (URL, management URL): the shared
        probe (timed, reading the broker as the pool's transport options lay it out), event monitor and
        control broadcasts (broadcast errors counted for the pool)."""
        url, management = broker
        celery_options = transport_options.as_celery() if transport_options else {}

        def count_errors(pool: CeleryWorkerPool, result: ConvergeResult) -> None:
            if result.errors:
                self.metrics.record_broadcast_error(namespace, name, len(result.errors))

        self.controller.use_transport_options(url, celery_options)
        limits, drain = controller_hooks(self.controller, url, count_errors)
        probe = TimedProbe(self.probes.probe(url, management, transport_options), self.metrics, url)
        monitor = self.telemetry.monitor(url, celery_options)
        return Sources(probe, monitor, workload, limits, drain, broker_url=url)

    def close(self) -> None:
        self.telemetry.stop()
        self.controller.close()
        self.probes.close()


@dataclass(frozen=True)
class EarlyWake:
    """The between-polls check of a pool that may still grow: is a burst waiting?"""

    probe: QueueProbe
    queues: tuple[str, ...]
    last: Decision
    autoscaling: AutoscalingSpec

    def due(self) -> bool:
        """True when ready messages call for a pass now; a broker that cannot answer waits for the poll."""
        try:
            waiting = sum(stats.depth for stats in self.probe.stats(self.queues).values())
        except BrokerUnavailable:
            return False
        return wakes_early(waiting, self.last, self.autoscaling)


@dataclass
class PoolLoop:
    """One pool's control loop: `step()` is one pass, `run()` passes until stopped."""

    namespace: str
    name: str
    reporter: Reporter
    sources: SourcesFor
    metrics: PoolMetrics
    memory: PoolMemory = field(default_factory=PoolMemory)
    clock: Clock = time.time
    last_broker: str | None = None  # the broker URL of the last pass that reached one
    interval: float = INVALID_SPEC_RETRY_SECONDS  # until the next pass: pollSeconds of the pool as last read
    wake: EarlyWake | None = None  # set while the last pass left the pool room to grow
    template_policy: TemplatePolicy | None = None  # what worker.template may set (None: local mode, no pods)

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.reporter, self.memory, self.clock, name=f"{self.namespace}/{self.name}")

    def step(self, source: Mapping[str, Any] | CeleryWorkerPool) -> PassResult:
        """One pass over the pool as `source` describes it now (kopf's live body, or a parsed pool)."""
        generation = _generation(source)
        self.interval, self.wake = INVALID_SPEC_RETRY_SECONDS, None
        pool: CeleryWorkerPool | None = None
        try:
            pool = source if isinstance(source, CeleryWorkerPool) else parse_pool(dict(source), self.template_policy)
            self.interval = pool.spec.autoscaling.poll_seconds
            sources = self.sources(pool)
            self.last_broker = sources.broker_url
            result = self.reconciler.reconcile(pool, sources, generation)
            self.wake = _early_wake(pool, sources, result)
        except (InvalidPool, SecretMissing, WorkloadMissing) as blocked:
            result = self.reconciler.blocked(BLOCKED_REASONS[type(blocked)], str(blocked), generation)
        autoscaling = pool.spec.autoscaling if pool else None
        carried_out = result.decision if result.mode is not Mode.RECOMMEND else None  # counted as scales
        self.metrics.record_pass(
            self.namespace, self.name, result.status, carried_out, result.busy_slots, result.telemetry, autoscaling
        )
        return result

    def run(
        self,
        stopping: Stopping,
        source: Callable[[], Mapping[str, Any] | CeleryWorkerPool],
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        """Pass after pass, every pollSeconds (an invalid spec: every 30 s; jittered) or sooner when a
        burst lands between passes, until `stopping` is set."""
        while not stopping.is_set():
            started = time.monotonic()
            self.step(source())
            after_pass()
            self._sleep(stopping, started + self.interval * random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER))

    def _sleep(self, stopping: Stopping, until: float) -> None:
        """Until the monotonic time `until`, `stopping`, or the early-wake check says a pass is due."""
        while not stopping.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            stopping.wait(min(left, WAKE_CHECK_SECONDS) if self.wake else left)
            if self.wake is not None and not stopping.is_set() and self.wake.due():
                return


def controller_hooks(
    controller: PoolController,
    broker_url: str,
    on_result: Callable[[CeleryWorkerPool, ConvergeResult], None] = lambda pool, result: None,
) -> tuple[LimitsConverger, Drainer]:
    """The limits and drain steps of a pass, done by the control broadcasts of `controller`.

    Limits converge in the background (the condition shows the latest finished pass; `on_result`
    sees each one once: the operator counts broadcast errors from it). Draining is waited for: the
    workers must be idle before replicas go down."""

    def limits(pool: CeleryWorkerPool, members: int) -> ControlReport:
        settings = replace(PoolSettings.from_spec(pool.spec), expected_workers=members)
        result, fresh = controller.converge_in_background(broker_url, pool.metadata.name, settings)
        if result is None:
            return ControlReport("Unknown", "Converging", "the first convergence pass is under way")
        if fresh:
            on_result(pool, result)
        return ControlReport(*result.condition, workers=result.stats)

    def drain(pool: CeleryWorkerPool, members: list[str]) -> list[str]:
        hostnames = [worker_hostname(pool.metadata.name, member) for member in members]
        timeout = min(grace_seconds(pool.spec), MAX_DRAIN_SECONDS)
        busy = controller.drain(broker_url, pool.metadata.name, hostnames, pool.spec.queues, timeout)
        return [member_of(hostname) for hostname in busy]

    return limits, drain


def _early_wake(pool: CeleryWorkerPool, sources: Sources, result: PassResult) -> EarlyWake | None:
    """The check to run between polls when this pass left the pool room to grow, else None (and
    always None unless the pool scales by itself: a paused or recommend-only pool would pass at once
    again and again)."""
    decision, autoscaling = result.decision, pool.spec.autoscaling
    if decision is None or decision.terms.concurrency is None or decision.replicas >= autoscaling.max_replicas:
        return None
    if result.mode is not Mode.AUTO:
        return None
    return EarlyWake(sources.probe, tuple(pool.spec.queues), decision, autoscaling)


def _generation(source: Mapping[str, Any] | CeleryWorkerPool) -> int | None:
    if isinstance(source, CeleryWorkerPool):
        return None
    generation = (source.get("metadata") or {}).get("generation")
    return int(generation) if generation is not None else None
