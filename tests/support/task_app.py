"""A Celery app for tests that provoke operations: tasks that sleep, leak memory or stamp their own
completion time in Redis, and a Redis visibility timeout a test chooses through
CWO_TEST_VISIBILITY_TIMEOUT (read as a worker starts; default Redis' hour, longer than any wait for a
rate-limit token, so nothing is redelivered twice)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from celery import Celery

app = Celery("cwo_task_test", set_as_current=False)
app.conf.update(
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": float(os.environ.get("CWO_TEST_VISIBILITY_TIMEOUT", "3600"))},
    worker_hijack_root_logger=False,
)
_kept: list[bytes] = []  # what `leak` never gives back


@contextmanager
def publisher(url: str) -> Iterator[Celery]:
    """An app that sends this module's tasks (by name) and control commands to `url`, for one test.
    Not `app` itself: Celery binds an app's producer pool to the first broker it publishes to and keeps
    it, so after a test on Redis, `app` would send a RabbitMQ test's tasks and broadcasts to Redis."""
    client = Celery(broker=url, set_as_current=False)
    try:
        yield client
    finally:
        client.close()


@app.task(name="tasks.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="tasks.quick")
def quick() -> None:
    time.sleep(0.05)


@app.task(name="tasks.leak")
def leak(mib: int) -> None:
    _kept.append(b"\x01" * (mib * 1024 * 1024))  # written, so resident


@app.task(name="tasks.stamp")
def stamp(key: str) -> None:
    time.sleep(0.1)
    redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).rpush(f"{key}:done", time.time())
