"""The Celery app `make demo` scales: one task that sleeps, and records how long it waited.

The broker comes from CELERY_BROKER_URL (Celery reads it itself), as in the operator's pods.
Each run appends `wait,run` seconds to a Redis list so the demo (and the real-workload benchmark)
can report the p95 wait.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

QUEUE = "demo"
WAITS_KEY = "cwo-demo:waits"

app = Celery("celery_worker_operator.demo.app", set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="demo.work")  # type: ignore[untyped-decorator]  # celery ships no types
def work(seconds: float, sent_at: float, key: str = WAITS_KEY) -> float:
    """Sleep `seconds`, having waited `now - sent_at` in the queue; `key` is the list it is recorded
    in (benchmarks and tests give each run its own)."""
    wait = time.time() - sent_at
    time.sleep(seconds)
    redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).rpush(key, f"{wait:.3f},{seconds:.3f}")
    return wait
