"""Opt-in publish stamp, so probes can tell how long the oldest task has waited.

A Celery message carries no publish time by default, so a broker can only say how many tasks wait,
not for how long. `instrument(app)` adds one: a `published_at` header (epoch seconds, read by the
Redis probe) and the AMQP `timestamp` property (whole seconds, which RabbitMQ's management API
reports as `head_message_timestamp`). Cost: one float and one int per published task.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, TypeVar

from celery.signals import before_task_publish

PUBLISHED_AT = "published_at"
_DISPATCH_UID = "celery_worker_operator.instrument"

App = TypeVar("App")


def _stamp(headers: dict[str, Any] | None = None, properties: dict[str, Any] | None = None, **_: Any) -> None:
    """before_task_publish handler: stamp the message unless the caller already did."""
    now = time.time()
    if headers is not None:
        headers.setdefault(PUBLISHED_AT, now)
    if properties is not None:
        properties.setdefault("timestamp", round(now))


def instrument(app: App) -> App:
    """Stamp every task this process publishes with its publish time; returns `app` for chaining.

    Celery's publish signal is process-wide, so this stamps tasks of every app in the process; calling
    it again (or for a second app) is harmless.
    """
    before_task_publish.connect(_stamp, weak=False, dispatch_uid=_DISPATCH_UID)
    return app


def published_at(headers: Mapping[str, Any], properties: Mapping[str, Any]) -> float | None:
    """The publish time a stamped message carries (the precise header first), or None."""
    for value in (headers.get(PUBLISHED_AT), properties.get("timestamp")):
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def uninstrument() -> None:
    """Stop stamping (tests, or an app that wants its messages byte-for-byte unchanged again)."""
    before_task_publish.disconnect(_stamp, dispatch_uid=_DISPATCH_UID)
