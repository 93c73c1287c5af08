"""Pools on this machine: replicas are real `celery worker` processes, supervised.

Same command line as the pods (workloads/command.py), hostname `<pool>.<namespace>@<pool>-<n>`. A worker that
dies unasked is reported with the last lines it wrote (Celery's own reason: "Unable to load celery
application") and replaced after a back-off that doubles from 10 s to 5 min, as the kubelet's
CrashLoopBackOff does, so a pool with a typo in its app does not restart a worker every poll.
Scale-down sends SIGTERM (Celery's warm shutdown: stop consuming, give back prefetched messages,
finish running tasks) to the least busy workers and reaps them later without blocking the loop;
`close()` stops every child, none is left behind, and should this process be killed its workers get
SIGTERM from the kernel (lifeline.py): start them from a thread that lives as long as they should.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..spec import CeleryWorkerPool
from . import WorkloadState, removal_order
from .command import grace_seconds, worker_args
from .lifeline import die_with_parent

log = logging.getLogger(__name__)

BROKER_ENV = "CELERY_BROKER_URL"
TAIL_LINES = 5  # lines of a dead worker's output quoted in its Warning
TAIL_CHARS = 600  # and at most this much of them: an Event message holds 1024
FIRST_BACKOFF_SECONDS = 10.0  # the kubelet's CrashLoopBackOff: 10 s, doubled per crash, up to 5 min,
MAX_BACKOFF_SECONDS = 300.0
BACKOFF_RESET_SECONDS = 600.0  # forgotten once a worker has run 10 min


@dataclass
class CrashBackoff:
    """When the pool may start a worker again after workers exited unasked. All its workers run the
    same command, so one back-off holds for the pool: a scale-up waits too, as a crash would repeat."""

    first: float = FIRST_BACKOFF_SECONDS
    cap: float = MAX_BACKOFF_SECONDS
    reset_after: float = BACKOFF_RESET_SECONDS
    exits: int = 0  # unasked exits in a row, none of them after a long enough run
    until: float = 0.0  # no start before this (monotonic clock)

    def exited(self, now: float, ran_seconds: float) -> float:
        """A worker exited unasked after running `ran_seconds`: the delay before the next start."""
        if ran_seconds >= self.reset_after:
            self.exits = 0
        delay = min(self.first * 2.0**self.exits, self.cap)
        self.exits += 1
        self.until = now + delay
        return delay

    def may_start(self, now: float) -> bool:
        return now >= self.until

    def ran(self, seconds: float) -> None:
        """A worker has been running `seconds`: long enough, and the exits before it are forgiven."""
        if seconds >= self.reset_after:
            self.exits = 0

    def looping(self) -> bool:
        """Workers keep exiting: twice or more in a row without one running `reset_after`."""
        return self.exits >= 2


@dataclass(frozen=True)
class WorkerExit:
    """A worker that exited unasked: its code, its last output lines, and when it is replaced."""

    member: str
    code: int
    tail: tuple[str, ...]
    exits: int  # unasked exits in a row, this one included
    restart_in: float

    def message(self) -> str:
        said = " | ".join(self.tail)[-TAIL_CHARS:]
        return (
            f"worker {self.member} exited with {self.code} ({self.exits} in a row; next start in "
            f"{self.restart_in:.0f} s): {said or 'no output'}"
        )


class _Output:
    """Reads a worker's output as it comes: passes it on to `sink` and keeps the last lines."""

    def __init__(self, pipe: IO[bytes], sink: IO[bytes] | None, lock: threading.Lock) -> None:
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._thread = threading.Thread(target=self._pump, args=(pipe, sink, lock), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[bytes], sink: IO[bytes] | None, lock: threading.Lock) -> None:
        with pipe:
            for line in pipe:
                if text := line.decode(errors="replace").strip():
                    self.tail.append(text)
                if sink is not None:
                    with lock:
                        sink.write(line)
                        sink.flush()

    def last_lines(self, wait: float) -> tuple[str, ...]:
        """The last lines, once the pipe closed (every process holding it is gone) or after `wait` s."""
        self._thread.join(wait)
        return tuple(self.tail)


@dataclass
class _Process:
    member: str
    popen: subprocess.Popen[bytes]
    output: _Output
    started: float
    stopping_since: float | None = None


@dataclass
class LocalWorkload:
    """Worker processes for one pool; call `observe()` every poll so crashes and exits are seen."""

    pool: CeleryWorkerPool
    broker_url: str
    cwd: Path = field(default_factory=Path.cwd)
    log_stream: IO[bytes] | None = None  # where the workers' output goes; None: only their last lines are kept
    on_exit: Callable[[WorkerExit], None] = lambda exit_: None
    python: str = sys.executable
    backoff: CrashBackoff = field(default_factory=CrashBackoff)
    _desired: int = 0  # replicas asked for; fewer run while a restart backs off
    _running: dict[str, _Process] = field(default_factory=dict)
    _stopping: dict[str, _Process] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _finished_seconds: float = 0.0  # worker-seconds of processes that have exited
    _last_exit: WorkerExit | None = None
    _output_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.pool.spec.worker is None:
            raise ValueError("local mode runs managed pools (spec.worker); this pool adopts a Deployment")

    def observe(self) -> WorkloadState:
        """Replicas are those asked for (a Deployment's spec.replicas); ready are those running."""
        self._reap_stopped()
        self._reap_exited()
        self._fill()
        now = time.monotonic()
        self.backoff.ran(max((now - p.started for p in self._running.values()), default=0.0))
        worker = self.pool.spec.worker
        looping = self._last_exit is not None and self.backoff.looping()
        since_epoch = time.time() - now  # process starts are on the monotonic clock, telemetry on the wall clock
        return WorkloadState(
            replicas=self._desired,
            ready_replicas=len(self._running),
            members=tuple(sorted(self._running)),
            concurrency=worker.concurrency if worker else None,
            crash_loop=self._last_exit.message() if looping and self._last_exit else None,
            started={member: since_epoch + p.started for member, p in self._running.items()},
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
        self._desired = replicas
        victims = removal_order(list(self._running), load)
        for member in victims[: max(len(self._running) - replicas, 0)]:
            self._stop(self._running.pop(member))
        self._fill()

    def close(self, timeout: float | None = None) -> None:
        """Warm-stop every worker, wait up to the grace period, then kill what is left."""
        self._desired = 0
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
        command = [self.python, "-m", "celery", *worker_args(self.pool.identity, member, self.pool.spec, worker)]
        env = dict(os.environ, **{BROKER_ENV: self.broker_url})
        popen = subprocess.Popen(
            command,
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Should this process be killed, its workers warm-stop (finish running tasks, give back
            # prefetched ones) rather than go on consuming with nobody to stop them.
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        assert popen.stdout is not None
        output = _Output(popen.stdout, self.log_stream, self._output_lock)
        self._running[member] = _Process(member, popen, output, time.monotonic())

    def _fill(self) -> None:
        """Start workers up to the replicas asked for, unless a crash back-off holds starts."""
        if not self.backoff.may_start(time.monotonic()):
            return
        while len(self._running) < self._desired:
            self._start()

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

    def _reap_exited(self) -> None:
        """Workers that exited unasked: reported with their last lines; replaced after the back-off."""
        for member, process in list(self._running.items()):
            code = process.popen.poll()
            if code is None:
                continue
            self._retire(self._running.pop(member))
            _kill_group(process.popen, signal.SIGKILL)  # prefork children outlive a killed parent
            now = time.monotonic()
            delay = self.backoff.exited(now, now - process.started)
            tail = process.output.last_lines(wait=2.0)
            self._last_exit = WorkerExit(member, code, tail, self.backoff.exits, delay)
            log.warning("pool %s: %s", self.pool.metadata.name, self._last_exit.message())
            self.on_exit(self._last_exit)

    def _retire(self, process: _Process) -> None:
        self._finished_seconds += time.monotonic() - process.started


def _kill_group(popen: subprocess.Popen[bytes], sig: signal.Signals, leader_only: bool = False) -> None:
    """Signal the worker (SIGTERM goes to the main process only: it shuts its pool down itself)."""
    with contextlib.suppress(ProcessLookupError):
        if leader_only:
            os.kill(popen.pid, sig)
        else:
            os.killpg(popen.pid, sig)
