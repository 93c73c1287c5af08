"""The Celery app of the chaos suite (tests/chaos): each task writes its start and its end, with the
worker that ran it, to a ledger in a Redis of its own (CWO_LEDGER_URL), never to the broker, so the
ledger survives the broker faults the suite causes and works for RabbitMQ pools too.

Late acknowledgement and a one-message prefetch: a worker that dies loses nothing (the message
comes back), and a 10 s Redis visibility timeout brings a dead worker's message back within the
test instead of after Redis' default hour.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

LEDGER_ENV = "CWO_LEDGER_URL"
RECORD = "chaos.record"
VISIBILITY_TIMEOUT = 10.0

app = Celery("cwo_chaos_test", set_as_current=False)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
    worker_hijack_root_logger=False,
)


@app.task(name=RECORD, bind=True)
def record(self: Any, key: str, number: int, seconds: float) -> None:
    """`<key>:started` and `<key>:ended` get "<number> <worker hostname> <unix time>" around the sleep."""
    ledger = redis.Redis.from_url(os.environ[LEDGER_ENV])
    ledger.rpush(f"{key}:started", f"{number} {self.request.hostname} {time.time()}")
    time.sleep(seconds)
    ledger.rpush(f"{key}:ended", f"{number} {self.request.hostname} {time.time()}")
