"""Poll-until for integration tests: robust on a loaded machine where fixed sleeps are flaky."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(measure: Callable[[], T], ok: Callable[[T], bool], timeout: float, interval: float = 0.1) -> T:
    """Call `measure` until `ok(value)`; fail with the last value after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value!r}")
        time.sleep(interval)
