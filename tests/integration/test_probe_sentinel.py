"""Celery on a Redis behind Redis Sentinel (Celery's `sentinel://` URL and `master_name`): the probe
asks the real sentinel started by scripts/brokers.sh for the master and measures it exactly."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection

from celery_worker_operator.brokers import open_probe
from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.spec import TransportOptions
from tests.conftest import SENTINEL_MASTER
from tests.support.celery_app import BROKER_ENV, HOLD
from tests.support.local_pool import step_until

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(150)]
ROOT = Path(__file__).resolve().parents[2]

OPTIONS = TransportOptions(master_name=SENTINEL_MASTER, priority_steps=list(range(10)), sep=":")


def test_queue_depth_through_the_sentinel(sentinel_url: str) -> None:
    queue = f"sentinel-{uuid.uuid4().hex[:8]}"
    # Celery's own form: a failover list of sentinels (the second is the same one, as a fallback).
    url = f"{sentinel_url};{sentinel_url.rsplit('/', 1)[0]}"
    app = Celery(set_as_current=False, broker=url)
    app.conf.broker_transport_options = OPTIONS.as_celery()
    probe = open_probe(url, transport_options=OPTIONS)
    try:
        for priority in (0, 4, 4, 9):
            app.send_task(HOLD, args=[0], queue=queue, priority=priority)
        stats = probe.stats([queue])[queue]
        with Connection(url, transport_options=OPTIONS.as_celery()) as connection:
            kombu_size = connection.default_channel._size(queue)
        assert (stats.depth, stats.priorities[4], stats.priorities[9]) == (4, 2, 1)
        assert stats.depth == kombu_size, "as kombu's own channel counts it"
    finally:
        probe.close()
        with Connection(url, transport_options=OPTIONS.as_celery()) as connection:
            connection.default_channel.queue_purge(queue)
        app.close()


def test_a_local_pool_behind_the_sentinel_scales_and_hears_its_workers(
    sentinel_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe, event monitor, control broadcasts and `celery worker` processes all find the master
    through the sentinel with the pool's transport options: the pool wakes from zero on a backlog,
    its workers drain it, and their events and limits reach the operator."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "operator"), str(ROOT)]))
    monkeypatch.setenv(BROKER_ENV, sentinel_url)  # the workers' app module reads it
    name = f"sentinel-{uuid.uuid4().hex[:8]}"
    pool = parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name},
            "spec": {
                "broker": {"url": sentinel_url, "transportOptions": OPTIONS.as_celery()},
                "queues": [name],
                "worker": {"app": "tests.support.celery_app:app", "image": "local", "concurrency": 2},
                "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "pollSeconds": 1, "taskDurationSeconds": 1},
                "limits": {"rateLimits": {HOLD: "600/m"}},
            },
        }
    )
    app = Celery(set_as_current=False, broker=sentinel_url)
    app.conf.broker_transport_options = OPTIONS.as_celery()
    run = LocalRun(pool, sentinel_url, cwd=ROOT, telemetry_window=10.0)
    try:
        for priority in range(8):
            app.send_task(HOLD, args=[0.5], queue=name, priority=priority)
        step_until(run, lambda: run.workload.observe().replicas > 0, timeout=10)
        step_until(run, lambda: run.reporter.status_now.get("depth") == 0, timeout=60)
        step_until(run, lambda: run.telemetry().live_workers > 0, timeout=30)
        step_until(run, lambda: _condition(run, "LimitsApplied") == "True", timeout=30)
    finally:
        run.close()
        app.close()


def _condition(run: LocalRun, kind: str) -> str | None:
    conditions = run.reporter.status_now.get("conditions", [])
    return next((c["status"] for c in conditions if c["type"] == kind), None)
