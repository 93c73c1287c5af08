"""A Celery app for advisor tests: tasks that sleep or leak memory, and a Redis visibility timeout a
test chooses through CWO_TEST_VISIBILITY_TIMEOUT (read as a worker starts), so each pitfall of the
operations guide can be provoked for real."""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("cwo_advice_test", set_as_current=False)
app.conf.update(
    task_acks_late=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": float(os.environ.get("CWO_TEST_VISIBILITY_TIMEOUT", "3600"))},
    worker_hijack_root_logger=False,
)
_kept: list[bytes] = []  # what `leak` never gives back


@app.task(name="advice.sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="advice.quick")
def quick() -> None:
    time.sleep(0.05)


@app.task(name="advice.leak")
def leak(mib: int) -> None:
    _kept.append(b"\x01" * (mib * 1024 * 1024))  # written, so resident
