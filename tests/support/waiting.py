"""Poll-until for integration tests: robust on a loaded machine where fixed sleeps are flaky."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

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


async def wait_for_async(
    measure: Callable[[], T | Awaitable[T]],
    ok: Callable[[T], bool] = bool,
    timeout: float = 5.0,
    interval: float = 0.05,
) -> T:
    """`wait_for` for async tests: sleeps with asyncio; `measure` may be sync or async."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = measure()
        if inspect.isawaitable(value):
            value = await value
        if ok(cast(T, value)):
            return cast(T, value)
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last value: {value!r}")
        await asyncio.sleep(interval)
