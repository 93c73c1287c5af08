"""Bounded sliding windows: the only memory telemetry keeps, pure and cheap per event.

A window is a ring of fixed-width time buckets. An event touches one bucket of its pool and one of
its task name (a few attribute updates, no per-event history); a snapshot merges the buckets still
inside the window. Percentiles come from a small reservoir per bucket, weighted by how many values
each reservoir stands for, so one busy second outweighs ten quiet ones as it should.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

RESERVOIR = 32  # values kept per bucket and measure: 30 buckets x 32 = 960 per window, plenty for a p95


class Sample:
    """Count, sum and a uniform reservoir (Vitter's algorithm R) of one measure in one bucket."""

    __slots__ = ("count", "total", "values")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.values: list[float] = []

    def add(self, value: float, rng: random.Random) -> None:
        self.count += 1
        self.total += value
        if len(self.values) < RESERVOIR:
            self.values.append(value)
            return
        slot = int(rng.random() * self.count)
        if slot < RESERVOIR:
            self.values[slot] = value

    def clear(self) -> None:
        self.count = 0
        self.total = 0.0
        self.values.clear()


class Bucket:
    """What happened in one time slot: arrivals, outcomes and the three durations we report."""

    __slots__ = ("arrived", "failed", "index", "runtime", "sent_wait", "succeeded", "wait")

    def __init__(self) -> None:
        self.index = -1
        self.arrived = self.succeeded = self.failed = 0
        self.runtime, self.wait, self.sent_wait = Sample(), Sample(), Sample()

    def reset(self, index: int) -> None:
        self.index = index
        self.arrived = self.succeeded = self.failed = 0
        self.runtime.clear()
        self.wait.clear()
        self.sent_wait.clear()


class Series:
    """A ring of buckets covering `width x len(buckets)` seconds; old buckets are reused, never kept."""

    __slots__ = ("buckets", "width")

    def __init__(self, width: float, count: int) -> None:
        self.width = width
        self.buckets = [Bucket() for _ in range(count)]

    def at(self, now: float) -> Bucket:
        """The bucket for `now`; a late event lands in the newer bucket rather than rewinding the ring."""
        index = int(now / self.width)
        bucket = self.buckets[index % len(self.buckets)]
        if bucket.index < index:
            bucket.reset(index)
        return bucket

    def live(self, now: float) -> list[Bucket]:
        """Buckets inside the window ending at `now`."""
        newest = int(now / self.width)
        oldest = newest - len(self.buckets) + 1
        return [b for b in self.buckets if oldest <= b.index <= newest]


class SeriesGroup:
    """One series per task name of a pool (or queue). A total is the merge of its tasks' buckets, so
    an event touches one bucket only; percentiles stay right because reservoirs merge by weight."""

    __slots__ = ("_count", "_width", "tasks")

    def __init__(self, width: float, count: int) -> None:
        self._width, self._count = width, count
        self.tasks: dict[str, Series] = {}

    def at(self, name: str, now: float) -> Bucket:
        series = self.tasks.get(name)
        if series is None:
            series = self.tasks[name] = Series(self._width, self._count)
        return series.at(now)

    def live(self, now: float, name: str | None = None) -> list[Bucket]:
        """Live buckets of one task, or of all of them (the total) when `name` is None."""
        if name is None:
            return [bucket for series in self.tasks.values() for bucket in series.live(now)]
        series = self.tasks.get(name)
        return series.live(now) if series else []

    def drop_idle(self, now: float) -> bool:
        """Forget tasks with nothing in the window; True when none is left."""
        for name in [name for name, series in self.tasks.items() if not series.live(now)]:
            del self.tasks[name]
        return not self.tasks


@dataclass(frozen=True)
class Summary:
    """Mean and 95th percentile of one measure over a window; None when nothing was measured."""

    mean: float | None
    p95: float | None


def summarize(samples: Iterable[Sample]) -> Summary:
    """Merge per-bucket samples: the mean is exact, the p95 weights each kept value by what it stands for."""
    weighted: list[tuple[float, float]] = []
    count, total = 0, 0.0
    for sample in samples:
        if sample.count:
            count += sample.count
            total += sample.total
            weight = sample.count / len(sample.values)
            weighted.extend((value, weight) for value in sample.values)
    if not count:
        return Summary(None, None)
    return Summary(total / count, _percentile(weighted, 0.95))


def _percentile(weighted: list[tuple[float, float]], quantile: float) -> float:
    weighted.sort()
    target = quantile * sum(weight for _, weight in weighted)
    seen = 0.0
    for value, weight in weighted:
        seen += weight
        if seen >= target:
            return value
    return weighted[-1][0]
