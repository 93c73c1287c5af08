"""One loop per pool, run by the kopf daemon on Kubernetes and by `local` on a laptop alike.

Each pass it reads the pool (a kopf body or a parsed pool), resolves where to measure and act
(`Sources`: the broker's probe and events, the workload), hands them to the pool's long-lived
`Reconciler`, and records the result in the metrics. Between passes a pool that may still grow
checks its queues' depth every second (one probe call measures all pools of a broker), so a burst
starts a pass at once instead of waiting out pollSeconds. The loop is a coroutine: it waits with
asyncio, lends each pass to a thread of a small pool shared by all pools, and the between-poll checks
of all waiting pools are made together (`LoopThreads`), so hundreds of pools waiting between passes
hold no thread and no timer each. Every reason a pool cannot be sized ends
here, in one place: an invalid spec, a missing Secret, a missing workload. What pools on one
broker share (probe, event monitor, control state) comes from `SharedResources`, one per process.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from .brokers import BrokerConnections, BrokerUnavailable, ProbeRegistry, QueueProbe, QueueStats
from .control import ConvergeResult, PoolController, PoolSettings
from .manifests import InvalidPool, parse_pool
from .metrics import PoolMetrics, TimedProbe
from .naming import PoolIdentity
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
# Passes of one broker's pools under way at once, at most: a broker that stops answering holds each
# of its pools' passes until the probe's timeout, and must not take every pass thread from the pools
# of the other brokers (a pass whose broker is not known yet, the first, is not limited).
PASSES_PER_BROKER = 8
STOP_CHECK_SECONDS = 0.2  # how often local mode's loop looks at its stop Event while waiting
POLL_JITTER = 0.1  # each interval is pollSeconds +-10 %: pools started together drift apart, not poll in lockstep
BLOCKED_REASONS: dict[type[Exception], str] = {
    InvalidPool: "InvalidSpec",
    SecretMissing: "SecretMissing",
    SecretUnusable: "SecretUnusable",
    WorkloadMissing: "WorkloadMissing",
    WorkloadNotOwned: "WorkloadNotOwned",
}

SourcesFor = Callable[[CeleryWorkerPool], Sources]  # raises SecretMissing or WorkloadMissing when it cannot
T = TypeVar("T")


class Stopping(Protocol):
    """The `stopped` of kopf's async daemons, and `EventStopping`, answer this."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Awaitable[object]: ...


@dataclass(frozen=True)
class EventStopping:
    """A threading.Event as the loop's `Stopping`: local mode's stop, set by a signal or a test.

    A threading.Event cannot wake an event loop, so `wait` looks at it every STOP_CHECK_SECONDS: nothing
    for local mode's one pool, and it holds no thread (a thread waiting on the Event would outlive a
    wait that a burst cut short, and keep an executor thread the passes need)."""

    event: threading.Event

    def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.event.is_set():
            left = STOP_CHECK_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, STOP_CHECK_SECONDS))


@dataclass(frozen=True)
class BrokerUse:
    """The per-broker resources one pool holds: the probe of (URL, management URL, transport options);
    the event monitor and control app of the URL."""

    url: str
    management: str | None
    transport_options: TransportOptions | None

    @property
    def probe_key(self) -> tuple[str, str | None, TransportOptions | None]:
        return self.url, self.management, self.transport_options


class Lease:
    """One pool's hold on its broker's resources. Revoked when the pool is released: a pass of the
    deleted pool still under way then reaches none of them (it would reopen a closed connection that
    nobody closes again); revoking waits for a call already in progress."""

    def __init__(self, use: BrokerUse) -> None:
        self.use = use
        self._lock = threading.Lock()
        self._revoked = False

    @contextmanager
    def held(self) -> Iterator[bool]:
        """While inside, the resources stay open if this yields True."""
        with self._lock:
            yield not self._revoked

    def revoke(self) -> None:
        with self._lock:
            self._revoked = True


@dataclass(frozen=True)
class LeasedProbe:
    """The shared probe, reached only while the pool's lease holds."""

    probe: QueueProbe
    lease: Lease

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        with self.lease.held() as holds:
            if not holds:
                raise BrokerUnavailable(self.lease.use.url, "the pool was deleted")
            return self.probe.stats(queues)

    def close(self) -> None:
        """Nothing: the probe is shared, `SharedResources` closes it with its last pool."""


@dataclass
class SharedResources:
    """What every pool of one process shares: per broker URL one probe, one event monitor and the
    control state, on the broker's shared connections (on Redis one command connection for all three,
    and the event stream's subscription); and the process's metrics.

    Reference-counted by pool: each pass records which broker its pool uses, and when the last pool
    on a broker is released (deleted, or moved to another broker) its probe, monitor, control app and
    connections are closed, so a cluster whose pools come and go keeps no connection to a broker
    nobody uses."""

    connections: BrokerConnections = field(default_factory=BrokerConnections)
    probes: ProbeRegistry = field(init=False)
    telemetry: TelemetryMonitors = field(default_factory=TelemetryMonitors)
    controller: PoolController = field(init=False)
    metrics: PoolMetrics = field(default_factory=PoolMetrics)
    _leases: dict[tuple[str, str], Lease] = field(default_factory=dict)  # (namespace, name) -> its hold
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.probes = ProbeRegistry(connections=self.connections)
        self.controller = PoolController(connections=self.connections)

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

        def count_errors(pool: CeleryWorkerPool, result: ConvergeResult) -> None:
            if result.errors:
                self.metrics.record_broadcast_error(namespace, name, len(result.errors))

        use = BrokerUse(url, management, transport_options)
        with self._lock:  # a release on another thread must not close what this pass is taking
            lease = self._leases.get((namespace, name))
            if lease is None or lease.use != use:
                self._leases[(namespace, name)] = Lease(use)
                if lease is not None:  # the pool moved: what it held may be unused now
                    self._let_go(namespace, name, lease)
                lease = self._leases[(namespace, name)]
            celery_options = self.connections.kombu_options(url, transport_options)
            self.controller.use_transport_options(url, celery_options)
            # timed inside the lease: a deleted pool's late pass records no series for a released broker
            probe = LeasedProbe(TimedProbe(self.probes.probe(*use.probe_key), self.metrics, url), lease)
            monitor = self.telemetry.monitor(url, celery_options)
        limits, drain = controller_hooks(self.controller, url, count_errors, lease)
        return Sources(probe, monitor, workload, limits, drain, broker_url=url)

    def release(self, namespace: str, name: str) -> None:
        """Pool `namespace/name` is gone: forget its control state and metrics, and close its broker's
        probe, monitor and control app (and drop its probe series) if no other pool uses them."""
        self.metrics.forget(namespace, name)
        with self._lock:
            lease = self._leases.pop((namespace, name), None)
            if lease is not None:
                self._let_go(namespace, name, lease)

    def brokers(self) -> set[str]:
        """The broker URLs some pool holds now."""
        with self._lock:
            return {lease.use.url for lease in self._leases.values()}

    def _let_go(self, namespace: str, name: str, lease: Lease) -> None:
        """Called with the lock held, once `namespace/name` no longer holds `lease`."""
        lease.revoke()
        use = lease.use
        self.controller.forget(use.url, PoolIdentity(namespace, name))
        held = [other.use for other in self._leases.values()]
        if all(other.probe_key != use.probe_key for other in held):
            self.probes.release(*use.probe_key)
        if all(other.url != use.url for other in held):
            self.telemetry.release(use.url)
            self.controller.release(use.url)
            self.connections.release(use.url)
            self.metrics.forget_broker(use.url)

    def close(self) -> None:
        self.telemetry.stop()
        self.controller.close()
        self.probes.close()
        self.connections.close()


@dataclass(frozen=True)
class EarlyWake:
    """The between-polls check of a pool that may still grow: is a burst waiting?"""

    probe: QueueProbe
    queues: tuple[str, ...]
    last: Decision
    autoscaling: AutoscalingSpec
    broker: str | None = None  # the checks of one broker are made together, apart from other brokers'

    def due(self) -> bool:
        """True when ready messages call for a pass now; a broker that cannot answer waits for the poll."""
        try:
            waiting = sum(stats.depth for stats in self.probe.stats(self.queues).values())
        except BrokerUnavailable:
            return False
        return wakes_early(waiting, self.last, self.autoscaling)


@dataclass
class BrokerPasses:
    slots: asyncio.Semaphore
    users: int = 0  # passes under way or waiting for a slot


class LoopThreads:
    """What the loops of one process share: the threads their passes run on (`threads`; None:
    asyncio's default executor), and their between-poll checks, made together.

    Once a second, for each broker, one call on those threads checks every pool of the broker that
    waits with a check armed, and wakes the pools a burst landed on: one timer and one thread
    hand-off per broker a second, whatever the number of pools (a timer and a hand-off per pool cost
    ~0.13 ms a check, 0.065 cores at 500 pools). A broker whose check is still under way (it stopped
    answering) is skipped: it delays only its own pools' checks; and its pools' passes take at most
    `per_broker` threads. Used from one event loop."""

    def __init__(self, threads: Executor | None = None, per_broker: int = PASSES_PER_BROKER) -> None:
        self.threads = threads
        self._per_broker = per_broker
        self._broker_passes: dict[str, BrokerPasses] = {}  # brokers with passes under way or waiting
        self._armed: dict[asyncio.Future[None], EarlyWake] = {}  # a waiting pool's wake-up -> its check
        self._checking: dict[str | None, asyncio.Task[None]] = {}  # broker -> its check under way
        self._ticker: asyncio.Task[None] | None = None

    async def run_pass(self, broker: str | None, step: Callable[[], T]) -> T:
        """`step()` on the threads, once fewer than `per_broker` passes of `broker` are under way."""
        if broker is None:
            return await _in_thread(self.threads, step)
        passes = self._broker_passes.setdefault(broker, BrokerPasses(asyncio.Semaphore(self._per_broker)))
        passes.users += 1
        try:
            async with passes.slots:
                return await _in_thread(self.threads, step)
        finally:
            passes.users -= 1
            if not passes.users:  # kept only while in use: brokers come and go with their pools
                del self._broker_passes[broker]

    async def until_due(self, wake: EarlyWake) -> None:
        """Returns once a check finds `wake` due (cancel it to stop waiting)."""
        due = asyncio.get_running_loop().create_future()
        self._armed[due] = wake
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="between-poll checks")
        try:
            await due
        finally:
            del self._armed[due]

    async def _tick(self) -> None:
        while self._armed:
            await asyncio.sleep(WAKE_CHECK_SECONDS)
            by_broker: dict[str | None, list[tuple[asyncio.Future[None], EarlyWake]]] = defaultdict(list)
            for due, wake in self._armed.items():
                by_broker[wake.broker].append((due, wake))
            for broker, armed in by_broker.items():
                if broker not in self._checking:
                    self._checking[broker] = asyncio.create_task(self._check(broker, armed))

    async def _check(self, broker: str | None, armed: list[tuple[asyncio.Future[None], EarlyWake]]) -> None:
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self.threads, lambda: [wake.due() for _, wake in armed]
            )
        finally:
            del self._checking[broker]
        for (due, _), is_due in zip(armed, found, strict=True):
            if is_due and not due.done():
                due.set_result(None)


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
    interval: float = INVALID_SPEC_RETRY_SECONDS  # until the next pass: pollSeconds of the pool as last read
    wake: EarlyWake | None = None  # set while the last pass left the pool room to grow
    broker: str | None = None  # the broker URL of the last pass that resolved one
    template_policy: TemplatePolicy | None = None  # what worker.template may set (None: local mode, no pods)

    def __post_init__(self) -> None:
        self.reconciler = Reconciler(self.reporter, self.memory, self.clock, name=f"{self.namespace}/{self.name}")
        self._parsed: tuple[str, CeleryWorkerPool] | None = None  # (resourceVersion, the body parsed)

    def _parse(self, body: Mapping[str, Any]) -> CeleryWorkerPool:
        """The pool of this body; parsed again only when the body's resourceVersion moved (any change
        to it moves it): validating the manifest was ~6 % of the operator's samples at 500 idle pools."""
        version = (body.get("metadata") or {}).get("resourceVersion")
        if self._parsed is None or version is None or self._parsed[0] != version:
            pool = parse_pool(dict(body), self.template_policy)  # InvalidPool: nothing kept, tried again
            self._parsed = (version, pool) if version is not None else None
            return pool
        return self._parsed[1]

    def step(self, source: Mapping[str, Any] | CeleryWorkerPool) -> PassResult:
        """One pass over the pool as `source` describes it now (kopf's live body, or a parsed pool)."""
        generation = _generation(source)
        self.interval, self.wake = INVALID_SPEC_RETRY_SECONDS, None
        pool: CeleryWorkerPool | None = None
        try:
            pool = source if isinstance(source, CeleryWorkerPool) else self._parse(source)
            self.interval = pool.spec.autoscaling.poll_seconds
            sources = self.sources(pool)
            self.broker = sources.broker_url
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

    async def run(
        self,
        stopping: Stopping,
        source: Callable[[], Mapping[str, Any] | CeleryWorkerPool],
        shared: LoopThreads,
        after_pass: Callable[[], None] = lambda: None,
    ) -> None:
        """Pass after pass, every pollSeconds (an invalid spec: every 30 s; jittered) or sooner when a
        burst lands between passes, until `stopping` is set. Passes run on the `shared` threads, and
        the between-poll checks with the other pools'; waiting holds no thread."""
        while not stopping.is_set():
            started = time.monotonic()
            await shared.run_pass(self.broker, partial(self.step, source()))
            after_pass()
            jittered = self.interval * random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)
            await self._sleep(stopping, started + jittered - time.monotonic(), shared)

    async def _sleep(self, stopping: Stopping, seconds: float, shared: LoopThreads) -> None:
        """For `seconds`, until `stopping`, or until a between-poll check says a pass is due."""
        if seconds <= 0 or stopping.is_set():
            return
        waits: set[asyncio.Future[object]] = {asyncio.ensure_future(stopping.wait(seconds))}
        if self.wake is not None:
            waits.add(asyncio.ensure_future(shared.until_due(self.wake)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


async def _in_thread(threads: Executor | None, call: Callable[[], T]) -> T:
    """`call()` on one of `threads`. Cancelled meanwhile (kopf cancels a daemon that outlives its
    stop), it waits for the call to end before it lets the cancellation through: a pass cannot be
    stopped halfway, and what follows the loop (letting go of a deleted pool's broker) must come
    after the pass that may have taken it again."""
    future = asyncio.get_running_loop().run_in_executor(threads, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


def controller_hooks(
    controller: PoolController,
    broker_url: str,
    on_result: Callable[[CeleryWorkerPool, ConvergeResult], None],
    lease: Lease,
) -> tuple[LimitsConverger, Drainer]:
    """The limits and drain steps of a pass, done by the control broadcasts of `controller` while
    the pool's `lease` holds.

    Limits converge in the background (the condition shows the latest finished pass; `on_result`
    sees each one once: the operator counts broadcast errors from it). Draining is waited for: the
    workers must be idle before replicas go down."""

    def limits(pool: CeleryWorkerPool, expected: int, members: Sequence[str]) -> ControlReport:
        settings = replace(PoolSettings.from_spec(pool.spec), expected_workers=expected)
        with lease.held() as holds:
            if not holds:
                return ControlReport("Unknown", "PoolDeleted", "the pool is being deleted")
            result, fresh = controller.converge_in_background(broker_url, pool.identity, settings, members)
        if result is None:
            return ControlReport("Unknown", "Converging", "the first convergence pass is under way")
        if fresh:
            on_result(pool, result)
        return ControlReport(*result.condition, workers=result.stats)

    def drain(pool: CeleryWorkerPool, members: list[str]) -> list[str]:
        timeout = min(grace_seconds(pool.spec), MAX_DRAIN_SECONDS)
        with lease.held() as holds:
            return controller.drain(broker_url, pool.identity, members, pool.spec.queues, timeout) if holds else members

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
    return EarlyWake(sources.probe, tuple(pool.spec.queues), decision, autoscaling, sources.broker_url)


def _generation(source: Mapping[str, Any] | CeleryWorkerPool) -> int | None:
    if isinstance(source, CeleryWorkerPool):
        return None
    generation = (source.get("metadata") or {}).get("generation")
    return int(generation) if generation is not None else None
