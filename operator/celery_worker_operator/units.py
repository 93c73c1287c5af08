"""Rates and durations as people write them: `10/m`, `200/h`, `10m`, `30s`, `1.5h`, `250ms`."""

from __future__ import annotations

import math
import re

SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `text`; a bare number is seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 250ms, 30s, 10m or 2h")
    return _finite(float(match.group(1)) * SECONDS[match.group(2) or "s"], text)


def parse_rate(text: str) -> float:
    """Tasks per second in `text` such as `10/m`; a bare number is per second (Celery's convention)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:/\s*(s|m|h))?\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a rate such as 5/s, 10/m or 200/h")
    return _finite(float(match.group(1)) / RATE_UNITS[match.group(2) or "s"], text)


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    return value


def per_second(rate: str | None) -> float:
    """A Celery rate limit in tasks per second, as `celery.utils.time.rate` reads it: none is 0 (no limit)."""
    return parse_rate(rate) if rate else 0.0
