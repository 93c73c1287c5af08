"""A pool in local mode on the test Redis, running `tests.support.local_app` workers for real."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.metrics import PoolMetrics

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def local_pool_run(
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    *,
    concurrency: int,
    max_replicas: int,
    scale_down_seconds: float,
    metrics: PoolMetrics | None = None,
    poll_seconds: float = 1,
    app: str = "tests.support.local_app:app",
    min_replicas: int = 0,
    spec: Mapping[str, Any] | None = None,
) -> Iterator[LocalRun]:
    """A fresh pool (queue named like it), polled every second unless told; its workers and keys go afterwards.

    `spec` adds fields to the pool's spec, section by section (`{"autoscaling": {...}, "limits": {...}}`).
    """
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "operator"), str(ROOT)]))
    monkeypatch.setenv("CELERY_BROKER_URL", redis_url)  # for the test's own sends and reads
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    pool = parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name},
            "spec": {
                "broker": {"url": _without_credentials(redis_url)},  # LocalRun is given the real URL
                "queues": [name],
                "worker": {"app": app, "image": "local", "concurrency": concurrency},
                "autoscaling": {
                    "minReplicas": min_replicas, "maxReplicas": max_replicas, "pollSeconds": poll_seconds,
                    "targetWaitSeconds": 5,
                    "taskDurationSeconds": 0.5, "scaleDown": {"stabilizationSeconds": scale_down_seconds},
                },
            },
        }
    )  # fmt: skip
    if spec:
        pool = parse_pool(_merged(pool.model_dump(mode="json", by_alias=True, exclude_none=True), {"spec": spec}))
    run = LocalRun(pool, redis_url, cwd=ROOT, telemetry_window=10.0, metrics=metrics or PoolMetrics())
    try:
        yield run
    finally:
        run.close()
        if redis_url.startswith("redis"):  # the ledgers live in Redis; an AMQP pool's test cleans its own queue
            redis.Redis.from_url(redis_url).delete(
                name, f"{name}:started", f"{name}:ended", f"{name}:waits", f"{name}:done"
            )


def _without_credentials(url: str) -> str:
    """The URL as a pool's spec may carry it: a spec refuses a password (RabbitMQ's guest:guest)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def step_until(run: LocalRun, done: object, timeout: float, every: float = 1.0) -> int:
    """Run passes every `every` seconds until `done()` holds; returns how many passes it took."""
    deadline, passes = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        run.step()
        passes += 1
        if done():  # type: ignore[operator]
            return passes
        time.sleep(every)
    raise AssertionError(f"not done after {timeout} s; last status {run.reporter.status_now}")


def _merged(base: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `more` laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in more.items():
        old = merged.get(key)
        merged[key] = _merged(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return merged
