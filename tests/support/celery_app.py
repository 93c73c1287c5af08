"""A Celery app for tests that run real workers; its broker comes from CWO_TEST_BROKER_URL.

Workers import this module (`-A tests.support.celery_app`); tests send by task name through their
own `make_app(url)`, so the sending side never depends on this module's environment.
"""

from __future__ import annotations

import os
import time

from celery import Celery

BROKER_ENV = "CWO_TEST_BROKER_URL"
HOLD = "cwo.hold"


def make_app(broker_url: str) -> Celery:
    """A plain app on `broker_url`, quiet and without a result backend."""
    app = Celery("cwo_tests", broker=broker_url, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    return app


app = make_app(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/15"))


@app.task(name=HOLD)
def hold(seconds: float) -> None:
    """Occupy a worker slot, so the tasks behind it stay prefetched (reserved) on the worker."""
    time.sleep(seconds)
