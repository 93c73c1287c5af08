"""A pool's worker start-up, measured: from a member's start to its worker's first event. Pure.

A member starts when its pod is created (Kubernetes) or its process is started (local mode); its
worker is first heard when its first event (`worker-online`, a heartbeat) reaches the operator's event
stream, which Celery sends as the worker begins to consume (but see below). The difference is what a new worker costs a
backlog before it serves: the policy's start-up term when `workerStartupSeconds` is unset.

Only members started while the operator was watching the stream count: a worker already running
when the operator starts (or the stream reconnects) is first heard long after its start. Each
member gives one sample at most, samples out of bounds (clock skew, a member heard only after a
lost stream) are dropped, and the median of the last few is the pool's start-up: one slow pod
moves it little.

The first event is `worker-online`, from Celery's Heart bootstep. Most workers send it once they
consume (within ~20 ms of their first task here), but Celery orders its consumer bootsteps by a
dependency sort that varies with the process's hash seed: in about a third of processes Heart starts
before Mingle, whose wait for its neighbours' replies (1 s) then still lies between `worker-online`
and the first task. Such a sample reads ~1 s short (0.5-0.8 s against ~1.5 s locally); the median of
several keeps it from deciding alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

MAX_STARTUP_SECONDS = 600.0  # longer than this is not a start-up but a worker heard late
KEPT_SAMPLES = 5


@dataclass(frozen=True)
class StartupSamples:
    """The last KEPT_SAMPLES start-ups of a pool's new workers, and the members already looked at."""

    samples: tuple[float, ...] = ()
    seen: frozenset[str] = frozenset()  # members sampled (or refused): each counts once

    @property
    def median(self) -> float | None:
        """The pool's start-up: the median of the kept samples, None before the first."""
        return statistics.median(self.samples) if self.samples else None

    def add(
        self, started: Mapping[str, float], first_heard: Mapping[str, float], watching_since: float | None
    ) -> StartupSamples:
        """These samples with those of members not looked at yet whose worker has been heard.

        `started`: each current member's start time; `first_heard`: when each member's worker was
        first heard; `watching_since`: when the operator began watching the event stream (None: not
        yet). All in seconds since the epoch. Members gone from `started` are forgotten.
        """
        if watching_since is None:
            return self
        fresh = sorted((started.keys() & first_heard.keys()) - self.seen, key=lambda member: first_heard[member])
        taken = [
            first_heard[member] - started[member]
            for member in fresh
            if started[member] >= watching_since and 0.0 <= first_heard[member] - started[member] <= MAX_STARTUP_SECONDS
        ]
        return StartupSamples((*self.samples, *taken)[-KEPT_SAMPLES:], (self.seen | set(fresh)) & started.keys())
