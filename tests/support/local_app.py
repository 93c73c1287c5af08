"""A Celery app for local-mode tests: each task records its start and end in Redis by task number,
so a test can prove every task ran exactly once and none was cut short."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

app = Celery("cwo_local_test", set_as_current=False)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # A killed worker's unacked tasks come back after this, not after Redis' default hour.
    broker_transport_options={"visibility_timeout": 8},
    worker_hijack_root_logger=False,
)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


@app.task(name="local.record")
def record(key: str, number: int, seconds: float) -> None:
    client = _redis()
    client.rpush(f"{key}:started", number)
    time.sleep(seconds)
    client.rpush(f"{key}:ended", number)
