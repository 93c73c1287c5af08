"""Prometheus metrics of the operator: what each pool's last pass saw and decided.

Pool and queue gauges come from the same status dict the reconciler writes to the API server, so
a dashboard and `kubectl get cwp` never disagree. They are kept as one snapshot per pool and
turned into samples at scrape time (a custom collector): a pool or queue that goes away, or a
measurement that goes missing, disappears from `/metrics` instead of lingering at its last value.

Labels stay low in cardinality: namespace, pool, queue, broker (redacted), scale direction and
a small fixed set of reason kinds — never the free-text reason of a decision.

Next to ours, the series of danihodovic/celery-exporter under its names and labels (plus
namespace and pool), so dashboards and alerts written for it work unchanged: queue length per
`queue_name`, `celery_worker_up` / `celery_worker_tasks_active` per `hostname`, task counters and
the runtime histogram per task `name`. They come from what the probe and the event telemetry
already measure; task names are capped per pool by telemetry (the rest count as "other").
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, Info, start_http_server
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .advice import AdviceKind
from .brokers import BrokerUnavailable, QueueProbe, QueueStats
from .policy import Decision, DecisionKind
from .redact import redact
from .spec import AutoscalingSpec
from .telemetry import PoolTelemetry
from .telemetry.model import HistogramTotals

PREFIX = "celery_worker_operator"
METRICS_PORT = 9090
Direction = Literal["up", "down"]
# The `reason` label of scale decisions: a decision's kind, in the label values dashboards already use.
REASON_LABELS = {
    DecisionKind.FROM_ZERO: "from_zero",
    DecisionKind.TO_ZERO: "to_zero",
    DecisionKind.BACKLOG: "backlog",
    DecisionKind.STEADY: "steady",
    DecisionKind.FALLBACK: "fallback",
    DecisionKind.BLIND: "hold",
    DecisionKind.HOLD: "hold",
    DecisionKind.DISABLED: "manual",  # spec.replicas (kubectl scale cwp) moved it
    DecisionKind.PAUSED: "manual",  # paused-replicas moved it
}
REASON_KINDS = tuple(dict.fromkeys(REASON_LABELS.values()))

# (metric suffix, status key, help): one gauge per pool from the status subresource.
POOL_GAUGES = (
    ("pool_depth_messages", "depth", "Messages waiting in all of the pool's queues."),
    ("pool_wait_seconds", "waitSeconds", "Age of the oldest waiting message of the pool."),
    ("pool_arrival_rate_tasks_per_second", "arrivalRate", "Tasks received per second by the pool's workers."),
    ("pool_service_time_seconds", "serviceTimeSeconds", "Mean task run time on the pool's workers."),
    ("pool_workers_online", "workersOnline", "Workers of the pool sending heartbeats."),
    (
        "pool_worker_startup_seconds",
        "workerStartupSeconds",
        "Measured start-up of the pool's new workers (start to first event; median of the last few).",
    ),
    ("pool_replicas", "replicas", "Current replicas of the pool's workload."),
    ("pool_ready_replicas", "readyReplicas", "Ready replicas of the pool's workload."),
    ("pool_desired_replicas", "desiredReplicas", "Replicas the last decision asked for."),
)
# (metric suffix, AutoscalingSpec attribute, help): what alerts compare the measurements with.
SPEC_GAUGES = (
    ("pool_target_wait_seconds", "target_wait_seconds", "spec.autoscaling.targetWaitSeconds of the pool."),
    ("pool_min_replicas", "min_replicas", "spec.autoscaling.minReplicas of the pool."),
    ("pool_max_replicas", "max_replicas", "spec.autoscaling.maxReplicas of the pool."),
)
# (metric suffix, key of one status.queues entry, help)
QUEUE_GAUGES = (
    ("queue_depth_messages", "depth", "Messages waiting in the queue (all priorities)."),
    ("queue_reserved_messages", "reserved", "Messages prefetched by workers and not yet acknowledged."),
    ("queue_consumers", "consumers", "Consumers of the queue, as the broker counts them."),
    ("queue_oldest_message_age_seconds", "oldestAgeSeconds", "Age of the oldest waiting message."),
)
POOL_LABELS = ("namespace", "pool")
CONDITION_STATUSES = ("True", "False", "Unknown")
# celery-exporter's task counters: (event, attribute of TaskTotals, help)
TASK_COUNTERS = (
    ("received", "received", "Tasks received by a worker."),
    ("started", "started", "Tasks a worker started running."),
    ("succeeded", "succeeded", "Tasks that ran successfully."),
    ("failed", "failed", "Tasks whose run raised."),
    ("retried", "retried", "Tasks that failed and will be retried."),
)


def reason_kind(decision: Decision) -> str:
    """The `reason` label of a scale decision: its kind, never its prose."""
    return REASON_LABELS[decision.kind]


@dataclass
class _Pool:
    """What the collector knows of one pool between scrapes."""

    status: Mapping[str, Any] = field(default_factory=dict)
    busy_slots: int | None = None
    telemetry: PoolTelemetry | None = None
    autoscaling: AutoscalingSpec | None = None
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    broadcast_errors: int = 0


class PoolMetrics(Collector):
    """The operator's metrics on their own registry; one instance per operator process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self.registry.register(self)
        Info(PREFIX, "The running operator.", registry=self.registry).info({"version": __version__})
        self._probe_seconds = Histogram(
            f"{PREFIX}_probe_duration_seconds",
            "Time of one broker probe (all queues of all pools on that broker).",
            ["broker"],
            registry=self.registry,
        )
        self._probe_errors = CounterMetric(
            f"{PREFIX}_probe_errors", "Broker probes that failed.", ["broker"], registry=self.registry
        )

    def record_pass(
        self,
        namespace: str,
        pool: str,
        status: Mapping[str, Any],
        decision: Decision | None,
        busy_slots: int | None = None,
        telemetry: PoolTelemetry | None = None,
        autoscaling: AutoscalingSpec | None = None,
    ) -> None:
        """Keep one pass's status (as `reconciler.build_status` shapes it), telemetry and targets
        (alerts compare the wait with targetWaitSeconds, desired with maxReplicas); count its scale."""
        with self._lock:
            state = self._pools.setdefault((namespace, pool), _Pool())
            state.status, state.busy_slots, state.telemetry = dict(status), busy_slots, telemetry
            state.autoscaling = autoscaling or state.autoscaling
        current = status.get("replicas")
        if decision is not None and current is not None and decision.replicas != current:
            direction: Direction = "up" if decision.replicas > current else "down"
            self.record_scale(namespace, pool, direction, reason_kind(decision))

    def record_scale(self, namespace: str, pool: str, direction: Direction, reason_kind: str) -> None:
        """Count one scale of a pool; `record_pass` calls it for the reconciler's own decisions."""
        if reason_kind not in REASON_KINDS:
            raise ValueError(f"reason kind {reason_kind!r} is not one of {REASON_KINDS}")
        with self._lock:
            self._pools.setdefault((namespace, pool), _Pool()).decisions[direction, reason_kind] += 1

    def record_broadcast_error(self, namespace: str, pool: str, count: int = 1) -> None:
        """Count control broadcasts (rate/time limits, consumers) that workers of a pool did not confirm."""
        with self._lock:
            self._pools.setdefault((namespace, pool), _Pool()).broadcast_errors += count

    def record_probe(self, broker: str, seconds: float, error: bool) -> None:
        """Time one broker probe; the URL is redacted again here, as a label is printed everywhere."""
        label = redact(broker)
        self._probe_seconds.labels(label).observe(seconds)
        errors = self._probe_errors.labels(label)  # at 0 from the first probe, so rate() has a series
        if error:
            errors.inc()

    def forget(self, namespace: str, pool: str) -> None:
        """Drop every series of a deleted pool."""
        with self._lock:
            self._pools.pop((namespace, pool), None)

    def forget_broker(self, broker: str) -> None:
        """Drop the probe series of a broker no pool uses any more: prometheus_client keeps every
        label set it was given until it is removed, so brokers that come and go would pile up."""
        label = redact(broker)
        for metric in (self._probe_seconds, self._probe_errors):
            with contextlib.suppress(KeyError):  # never probed; older prometheus_client raises for that
                metric.remove(label)

    def serve(self, port: int = METRICS_PORT, addr: str = "0.0.0.0") -> int:
        """Serve `/metrics` from a daemon thread on all addresses (Prometheus scrapes the pod IP).

        Returns the bound port, which tests need when they ask for port 0.
        """
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop the server started by `serve`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def collect(self) -> Iterator[Metric]:
        """Samples for every pool known now (called by the registry at scrape time)."""
        with self._lock:
            pools = {key: replace(p, decisions=Counter(p.decisions)) for key, p in self._pools.items()}
        yield from _pool_gauges(pools)
        yield from _queue_gauges(pools)
        yield from _pool_counters(pools)
        yield _advice(pools)
        yield _conditions(pools)
        yield from _exporter_queue_gauges(pools)
        yield from _exporter_worker_gauges(pools)
        yield from _exporter_task_series(pools)


Pools = Mapping[tuple[str, str], _Pool]


def _pool_gauges(pools: Pools) -> Iterator[Metric]:
    for suffix, key, help_ in POOL_GAUGES:
        family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=POOL_LABELS)
        for labels, pool in pools.items():
            if pool.status.get(key) is not None:
                family.add_metric(labels, float(pool.status[key]))
        yield family
    for suffix, attribute, help_ in SPEC_GAUGES:
        family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=POOL_LABELS)
        for labels, pool in pools.items():
            if pool.autoscaling is not None:
                family.add_metric(labels, float(getattr(pool.autoscaling, attribute)))
        yield family
    busy = GaugeMetricFamily(f"{PREFIX}_pool_busy_slots", "Task slots running a task.", labels=POOL_LABELS)
    for labels, pool in pools.items():
        if pool.busy_slots is not None:
            busy.add_metric(labels, pool.busy_slots)
    yield busy


def _queue_gauges(pools: Pools) -> Iterator[Metric]:
    for suffix, key, help_ in QUEUE_GAUGES:
        family = GaugeMetricFamily(f"{PREFIX}_{suffix}", help_, labels=(*POOL_LABELS, "queue"))
        for labels, pool in pools.items():
            for queue in pool.status.get("queues", []):
                if queue.get(key) is not None:
                    family.add_metric((*labels, queue["name"]), float(queue[key]))
        yield family


def _pool_counters(pools: Pools) -> Iterator[Metric]:
    decisions = CounterMetricFamily(
        f"{PREFIX}_scale_decisions",
        "Scale decisions carried out, by direction and kind of reason.",
        labels=(*POOL_LABELS, "direction", "reason"),
    )
    errors = CounterMetricFamily(
        f"{PREFIX}_broadcast_errors", "Control broadcasts that workers did not confirm.", labels=POOL_LABELS
    )
    for labels, pool in pools.items():
        for (direction, kind), count in pool.decisions.items():
            decisions.add_metric((*labels, direction, kind), count)
        errors.add_metric(labels, pool.broadcast_errors)
    yield from (decisions, errors)


def _advice(pools: Pools) -> Metric:
    """1 per advisor finding that holds now, 0 for the others, from the pool's `Advice` condition."""
    family = GaugeMetricFamily(
        f"{PREFIX}_advice", "Operations-guide pitfalls found in the pool (1) or not (0).", labels=(*POOL_LABELS, "kind")
    )
    for labels, pool in pools.items():
        advice = next((c for c in pool.status.get("conditions", []) if c.get("type") == "Advice"), None)
        if advice is None:
            continue
        found = set(advice["reason"].split(",")) if advice.get("status") == "True" else set()
        for kind in AdviceKind:
            family.add_metric((*labels, kind.value), float(kind.value in found))
    return family


def _conditions(pools: Pools) -> Metric:
    """kube-state-metrics' shape: one series per condition and status, 1 for the one that holds."""
    family = GaugeMetricFamily(
        f"{PREFIX}_pool_condition",
        "The pool's status conditions: 1 for the status each condition has now, 0 for the others.",
        labels=(*POOL_LABELS, "type", "status"),
    )
    for labels, pool in pools.items():
        for condition in pool.status.get("conditions", []):
            for status in CONDITION_STATUSES:
                family.add_metric((*labels, condition["type"], status.lower()), float(condition["status"] == status))
    return family


def _exporter_queue_gauges(pools: Pools) -> Iterator[Metric]:
    """celery-exporter's per-queue gauges: length (all priorities), consumers, workers online."""
    labels = (*POOL_LABELS, "queue_name")
    length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue (all priorities).", labels=labels)
    consumers = GaugeMetricFamily("celery_active_consumer_count", "Consumers of the queue (RabbitMQ).", labels=labels)
    workers = GaugeMetricFamily("celery_active_worker_count", "Workers online consuming the queue.", labels=labels)
    for key, pool in pools.items():
        for queue in pool.status.get("queues", []):
            length.add_metric((*key, queue["name"]), float(queue["depth"]))
            if queue.get("consumers") is not None:
                consumers.add_metric((*key, queue["name"]), float(queue["consumers"]))
            if pool.telemetry is not None:
                workers.add_metric((*key, queue["name"]), float(pool.telemetry.live_workers))
    yield from (length, consumers, workers)


def _exporter_worker_gauges(pools: Pools) -> Iterator[Metric]:
    labels = (*POOL_LABELS, "hostname")
    up = GaugeMetricFamily("celery_worker_up", "1 while the worker sends heartbeats.", labels=labels)
    active = GaugeMetricFamily("celery_worker_tasks_active", "Tasks the worker is running.", labels=labels)
    for key, pool in pools.items():
        for hostname, worker in (pool.telemetry.workers if pool.telemetry else {}).items():
            up.add_metric((*key, hostname), float(worker.online))
            active.add_metric((*key, hostname), float(worker.active if worker.online else 0))
    yield from (up, active)


def _exporter_task_series(pools: Pools) -> Iterator[Metric]:
    """celery-exporter's task counters and runtime histogram, and the wait before a task started."""
    labels = (*POOL_LABELS, "name")
    counters = {
        attribute: CounterMetricFamily(f"celery_task_{event}", help_, labels=labels)
        for event, attribute, help_ in TASK_COUNTERS
    }
    runtime = HistogramMetricFamily("celery_task_runtime", "Run time of finished tasks, seconds.", labels=labels)
    wait = HistogramMetricFamily(
        "celery_task_queue_wait_seconds",
        "Time from task-received to task-started (prefetched on a worker, waiting for a slot), seconds.",
        labels=labels,
    )
    for key, pool in pools.items():
        for name, totals in (pool.telemetry.totals if pool.telemetry else {}).items():
            for attribute, family in counters.items():
                family.add_metric((*key, name), getattr(totals, attribute))
            runtime.add_metric((*key, name), *_histogram(totals.runtime))
            wait.add_metric((*key, name), *_histogram(totals.wait))
    yield from (*counters.values(), runtime, wait)


def _histogram(totals: HistogramTotals) -> tuple[list[tuple[str, float]], float]:
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), float(count))
        for bound, count in zip(totals.bounds, totals.counts, strict=True)
    ]
    return buckets, totals.total


class TimedProbe:
    """A broker probe whose every call is timed, and counted when the broker could not answer."""

    def __init__(self, probe: QueueProbe, metrics: PoolMetrics, broker: str) -> None:
        self.probe, self.metrics, self.broker = probe, metrics, broker

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        started = time.monotonic()
        try:
            stats = self.probe.stats(queues)
        except BrokerUnavailable:
            self.metrics.record_probe(self.broker, time.monotonic() - started, error=True)
            raise
        self.metrics.record_probe(self.broker, time.monotonic() - started, error=False)
        return stats

    def close(self) -> None:
        self.probe.close()
