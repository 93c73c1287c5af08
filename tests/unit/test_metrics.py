"""The exporter: series from the reconciler's status dict, low-cardinality scale reasons, removal."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_worker_operator.metrics import PoolMetrics, reason_kind
from celery_worker_operator.policy import Observation, QueueObservation, decide
from celery_worker_operator.spec import AutoscalingSpec
from celery_worker_operator.telemetry import EventAggregator

STATUS: dict[str, Any] = {
    "replicas": 2, "readyReplicas": 1, "desiredReplicas": 3, "depth": 7, "waitSeconds": 12.0,
    "arrivalRate": 1.5, "serviceTimeSeconds": 0.4, "workersOnline": 2,
    "queues": [
        {"name": "default", "depth": 5, "reserved": 2, "consumers": 2, "oldestAgeSeconds": 12.0},
        {"name": "mail", "depth": 2, "reserved": 0, "consumers": 2},
    ],
}  # fmt: skip


def samples(metrics: PoolMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: PoolMetrics, metric: str, **labels: str) -> float | None:
    return samples(metrics).get((metric, frozenset(labels.items())))


def test_pool_and_queue_series_carry_the_status_values() -> None:
    metrics = PoolMetrics()
    metrics.record_pass("prod", "mail", STATUS, None, busy_slots=3)
    pool = {"namespace": "prod", "pool": "mail"}
    assert value(metrics, "celery_worker_operator_pool_depth_messages", **pool) == 7
    assert value(metrics, "celery_worker_operator_pool_replicas", **pool) == 2
    assert value(metrics, "celery_worker_operator_pool_desired_replicas", **pool) == 3
    assert value(metrics, "celery_worker_operator_pool_busy_slots", **pool) == 3
    assert value(metrics, "celery_worker_operator_queue_reserved_messages", **pool, queue="default") == 2
    assert value(metrics, "celery_worker_operator_queue_oldest_message_age_seconds", **pool, queue="default") == 12
    assert value(metrics, "celery_worker_operator_queue_oldest_message_age_seconds", **pool, queue="mail") is None
    assert value(metrics, "celery_worker_operator_info", version="0.1.0") == 1


def test_what_goes_missing_disappears_instead_of_going_stale() -> None:
    metrics = PoolMetrics()
    metrics.record_pass("prod", "mail", STATUS, None, busy_slots=3)
    blind = {k: v for k, v in STATUS.items() if k not in ("waitSeconds", "arrivalRate")}
    metrics.record_pass("prod", "mail", blind | {"queues": STATUS["queues"][:1]}, None)
    pool = {"namespace": "prod", "pool": "mail"}
    assert value(metrics, "celery_worker_operator_pool_wait_seconds", **pool) is None
    assert value(metrics, "celery_worker_operator_pool_busy_slots", **pool) is None
    assert value(metrics, "celery_worker_operator_queue_depth_messages", **pool, queue="mail") is None
    assert value(metrics, "celery_worker_operator_queue_depth_messages", **pool, queue="default") == 5


def test_forget_drops_every_series_of_the_pool_only() -> None:
    metrics = PoolMetrics()
    for pool in ("a", "b"):
        metrics.record_pass("ns", pool, STATUS, None)
        metrics.record_scale("ns", pool, "up", "backlog")
        metrics.record_broadcast_error("ns", pool, 2)
    metrics.forget("ns", "a")
    assert not [key for key in samples(metrics) if ("pool", "a") in key[1]]
    assert value(metrics, "celery_worker_operator_broadcast_errors_total", namespace="ns", pool="b") == 2
    scale = {"namespace": "ns", "pool": "b", "direction": "up", "reason": "backlog"}
    assert value(metrics, "celery_worker_operator_scale_decisions_total", **scale) == 1


SPEC = AutoscalingSpec(min_replicas=0, max_replicas=10, task_duration_seconds=1.0, fallback_replicas=None)


def observe(current: int, depth: int | None, arrival: float = 0.0, busy: int = 0) -> Observation:
    queues = (QueueObservation("q", depth),)
    measured = None if depth is None else 0.0
    return Observation(0.0, current, queues, measured, arrival_rate=arrival, busy_slots=busy, live_workers=current)


@pytest.mark.parametrize(
    ("obs", "spec", "kind"),
    [
        (observe(0, 50), SPEC, "from_zero"),
        (observe(3, 0), SPEC, "to_zero"),
        (observe(1, 500), SPEC, "backlog"),
        (observe(1, 0, arrival=20.0, busy=1), SPEC, "steady"),
        (observe(2, None), SPEC.model_copy(update={"fallback_replicas": 5}), "fallback"),
        (observe(12, None), SPEC, "hold"),  # blind, above a lowered maxReplicas: held down to max
    ],
)
def test_reason_kind_folds_real_decisions_into_a_fixed_set(obs: Observation, spec: AutoscalingSpec, kind: str) -> None:
    decision = decide(obs, spec, concurrency=4)
    assert decision.replicas != obs.current_replicas, decision
    assert reason_kind(decision) == kind


def test_a_pass_that_scales_is_counted_once_with_its_kind() -> None:
    metrics = PoolMetrics()
    decision = decide(observe(0, 50), SPEC, concurrency=4)
    metrics.record_pass("ns", "p", {"replicas": 0}, decision)
    metrics.record_pass("ns", "p", {"replicas": decision.replicas}, decide(observe(1, 1), SPEC, concurrency=4))
    counted = {k: v for k, v in samples(metrics).items() if k[0] == "celery_worker_operator_scale_decisions_total"}
    assert list(counted.values()) == [1]
    (labels,) = [dict(k[1]) for k in counted]
    assert (labels["direction"], labels["reason"]) == ("up", "from_zero")


def test_free_text_reasons_never_become_labels() -> None:
    with pytest.raises(ValueError, match="reason kind"):
        PoolMetrics().record_scale("ns", "p", "up", "scale up 0 -> 3: 50 waiting")


def test_probe_series_are_labelled_by_the_redacted_broker() -> None:
    metrics = PoolMetrics()
    metrics.record_probe("redis://:hunter2@redis:6379/0", 0.02, error=True)
    metrics.record_probe("redis://:hunter2@redis:6379/0", 0.01, error=False)
    broker = "redis://:***@redis:6379/0"
    assert value(metrics, "celery_worker_operator_probe_duration_seconds_count", broker=broker) == 2
    assert value(metrics, "celery_worker_operator_probe_errors_total", broker=broker) == 1
    assert all("hunter2" not in str(key) for key in samples(metrics))


def test_forget_broker_drops_its_probe_series_only() -> None:
    metrics = PoolMetrics()
    for broker in ("redis://:hunter2@gone:6379/0", "redis://kept:6379/0"):
        metrics.record_probe(broker, 0.01, error=True)
    metrics.forget_broker("redis://:hunter2@gone:6379/0")
    metrics.forget_broker("amqp://never-probed//")
    brokers = {dict(labels).get("broker") for _, labels in samples(metrics)} - {None}
    assert brokers == {"redis://kept:6379/0"}


def test_serve_exposes_metrics_over_http() -> None:
    metrics = PoolMetrics()
    metrics.record_pass("ns", "p", STATUS, None)
    port = metrics.serve(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.stop()
    assert 'celery_worker_operator_pool_depth_messages{namespace="ns",pool="p"} 7.0' in body


def test_celery_exporter_series_come_from_the_status_and_the_telemetry() -> None:
    aggregator = EventAggregator(window=10.0)
    for second in range(4):
        task = {"hostname": "mail@pod-1", "uuid": f"t{second}", "timestamp": 100.0 + second}
        aggregator.feed({**task, "type": "task-received", "name": "mail.send"}, 100.0 + second)
        aggregator.feed({**task, "type": "task-started"}, 100.0 + second)
        aggregator.feed({**task, "type": "task-succeeded", "runtime": 0.3}, 100.0 + second)
    aggregator.feed({"type": "worker-heartbeat", "hostname": "mail@pod-1", "active": 1, "freq": 2.0}, 104.0)
    conditions = [{"type": "Ready", "status": "True"}, {"type": "MetricsAvailable", "status": "False"}]
    metrics = PoolMetrics()
    metrics.record_pass(
        "prod", "mail", STATUS | {"conditions": conditions}, None, 1, aggregator.snapshot("mail", 104.0)
    )
    pool = {"namespace": "prod", "pool": "mail"}
    assert value(metrics, "celery_queue_length", **pool, queue_name="default") == 5
    assert value(metrics, "celery_active_consumer_count", **pool, queue_name="mail") == 2
    assert value(metrics, "celery_worker_up", **pool, hostname="mail@pod-1") == 1
    assert value(metrics, "celery_worker_tasks_active", **pool, hostname="mail@pod-1") == 1
    task = {**pool, "name": "mail.send"}
    assert value(metrics, "celery_task_received_total", **task) == 4
    assert value(metrics, "celery_task_succeeded_total", **task) == 4
    assert value(metrics, "celery_task_failed_total", **task) == 0
    assert value(metrics, "celery_task_runtime_count", **task) == 4
    assert value(metrics, "celery_task_runtime_bucket", **task, le="0.25") == 0
    assert value(metrics, "celery_task_runtime_bucket", **task, le="0.5") == 4
    assert value(metrics, "celery_task_queue_wait_seconds_bucket", **task, le="0.005") == 4
    assert value(metrics, "celery_worker_operator_pool_condition", **pool, type="Ready", status="true") == 1
    assert value(metrics, "celery_worker_operator_pool_condition", **pool, type="MetricsAvailable", status="true") == 0
    assert value(metrics, "celery_worker_operator_pool_condition", **pool, type="MetricsAvailable", status="false") == 1
