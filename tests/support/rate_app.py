"""A Celery app for pool-rate tests: each task stamps its own completion time in Redis, so a test
measures the pool's throughput from the tasks themselves rather than from the operator."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

app = Celery("cwo_rate_test", set_as_current=False)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Longer than any share's wait for a token (10/m: 6 s per task, 2 held): nothing is redelivered twice.
    broker_transport_options={"visibility_timeout": 60},
    worker_hijack_root_logger=False,
)


@app.task(name="rate.stamp")
def stamp(key: str) -> None:
    time.sleep(0.1)
    redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).rpush(f"{key}:done", time.time())
