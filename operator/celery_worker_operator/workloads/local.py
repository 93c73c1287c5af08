"""Pools on this machine: replicas are real `celery worker` processes, supervised.

Same command line as the pods (workloads/command.py), hostname `<pool>@<pool>-<n>`. A worker that
dies unasked is replaced and reported. Scale-down sends SIGTERM (Celery's warm shutdown: stop
consuming, give back prefetched messages, finish running tasks) to the least busy workers and
reaps them later without blocking the loop; `close()` stops every child, none is left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..spec import CeleryWorkerPool
from . import WorkloadState, removal_order
from .command import grace_seconds, worker_args

log = logging.getLogger(__name__)

BROKER_ENV = "CELERY_BROKER_URL"


@dataclass
class _Process:
    member: str
    popen: subprocess.Popen[bytes]
    started: float
    stopping_since: float | None = None


@dataclass
class LocalWorkload:
    """Worker processes for one pool; call `observe()` every poll so crashes and exits are seen."""

    pool: CeleryWorkerPool
    broker_url: str
    cwd: Path = field(default_factory=Path.cwd)
    log_stream: IO[bytes] | None = None  # where the workers' output goes; None: discarded
    on_restart: Callable[[str, int], None] = lambda member, code: None
    python: str = sys.executable
    _running: dict[str, _Process] = field(default_factory=dict)
    _stopping: dict[str, _Process] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _finished_seconds: float = 0.0  # worker-seconds of processes that have exited

    def __post_init__(self) -> None:
        if self.pool.spec.worker is None:
            raise ValueError("local mode runs managed pools (spec.worker); this pool adopts a Deployment")

    def observe(self) -> WorkloadState:
        self._reap_stopped()
        self._replace_crashed()
        worker = self.pool.spec.worker
        return WorkloadState(
            replicas=len(self._running),
            ready_replicas=len(self._running),
            members=tuple(sorted(self._running)),
            concurrency=worker.concurrency if worker else None,
        )

    def pid(self, member: str) -> int:
        """The process id of a running member (its process group leader), for supervisors and tests."""
        return self._running[member].popen.pid

    def worker_seconds(self) -> float:
        """What this pool has cost so far: seconds each worker process has existed, summed."""
        now = time.monotonic()
        alive = [*self._running.values(), *self._stopping.values()]
        return self._finished_seconds + sum(now - p.started for p in alive)

    def alive(self) -> int:
        """Worker processes that exist right now, serving or shutting down: what a cost sampler counts.
        Safe to call from another thread than the one that scales."""
        processes = [*self._running.values(), *self._stopping.values()]
        return sum(process.popen.poll() is None for process in processes)

    def scale(self, replicas: int, load: Mapping[str, int]) -> None:
        while len(self._running) < replicas:
            self._start()
        victims = removal_order(list(self._running), load)
        for member in victims[: max(len(self._running) - replicas, 0)]:
            self._stop(self._running.pop(member))

    def close(self, timeout: float | None = None) -> None:
        """Warm-stop every worker, wait up to the grace period, then kill what is left."""
        for process in list(self._running.values()):
            self._stop(process)
        self._running.clear()
        deadline = time.monotonic() + (timeout if timeout is not None else grace_seconds(self.pool.spec))
        for process in list(self._stopping.values()):
            try:
                process.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in time: killing it", process.member)
                _kill_group(process.popen, signal.SIGKILL)
                process.popen.wait()
            self._retire(process)
        self._stopping.clear()

    def _start(self) -> None:
        worker = self.pool.spec.worker
        assert worker is not None
        member = f"{self.pool.metadata.name}-{next(self._numbers)}"
        command = [self.python, "-m", "celery", *worker_args(self.pool.metadata.name, member, self.pool.spec, worker)]
        env = dict(os.environ, **{BROKER_ENV: self.broker_url})
        output = self.log_stream if self.log_stream is not None else subprocess.DEVNULL
        popen = subprocess.Popen(
            command, cwd=self.cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._running[member] = _Process(member, popen, time.monotonic())

    def _stop(self, process: _Process) -> None:
        process.stopping_since = time.monotonic()
        _kill_group(process.popen, signal.SIGTERM, leader_only=True)
        self._stopping[process.member] = process

    def _reap_stopped(self) -> None:
        limit = grace_seconds(self.pool.spec)
        for member, process in list(self._stopping.items()):
            if process.popen.poll() is not None:
                self._retire(self._stopping.pop(member))
            elif process.stopping_since is not None and time.monotonic() - process.stopping_since > limit:
                _kill_group(process.popen, signal.SIGKILL)  # the grace period, as the kubelet enforces it

    def _replace_crashed(self) -> None:
        for member, process in list(self._running.items()):
            code = process.popen.poll()
            if code is None:
                continue
            self._retire(self._running.pop(member))
            _kill_group(process.popen, signal.SIGKILL)  # prefork children outlive a killed parent
            log.warning("worker %s exited with %s: starting a replacement", member, code)
            self.on_restart(member, code)
            self._start()

    def _retire(self, process: _Process) -> None:
        self._finished_seconds += time.monotonic() - process.started


def _kill_group(popen: subprocess.Popen[bytes], sig: signal.Signals, leader_only: bool = False) -> None:
    """Signal the worker (SIGTERM goes to the main process only: it shuts its pool down itself)."""
    with contextlib.suppress(ProcessLookupError):
        if leader_only:
            os.kill(popen.pid, sig)
        else:
            os.killpg(popen.pid, sig)
