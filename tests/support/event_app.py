"""The Celery app the telemetry tests run real workers with; the broker comes from CWO_EVENTS_BROKER.

Tests send tasks by name through `make_app(url)`, so the sender never imports the worker's module state.
"""

from __future__ import annotations

import os
import time

from celery import Celery

SLEEP, FAIL = "cwo.telemetry.sleep", "cwo.telemetry.fail"


def make_app(broker_url: str, *, sent_events: bool = False) -> Celery:
    """An app on `broker_url`; with `sent_events` it publishes task-sent events as clients may."""
    app = Celery("event_app", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_send_sent_event=sent_events,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


BROKER_ENV = "CWO_EVENTS_BROKER"
app = make_app(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/15"))


@app.task(name=SLEEP)
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name=FAIL)
def fail() -> None:
    raise RuntimeError("failing on purpose, for the failure rate")
