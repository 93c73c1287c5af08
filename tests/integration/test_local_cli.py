"""`celery-worker-operator local` as a person runs it: workers come up, Ctrl-C, SIGTERM and SIGHUP stop
every one of them (and a SIGKILL of it kills none of them first: they stop on their own), and with
its output in a file it writes plain log lines, one per scale decision."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.support.local_app import app, record
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ (.+)")
LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
DECISION = re.compile(r"Scaled(?:Up|Down): scale (?:up|down) (\d+) -> (\d+)")
BURST = 200
GRACE_SECONDS = 30  # the pools' grace period: no hard time limit, no soft shutdown (workloads/command.py)


def workers_of(pool: str) -> list[str]:
    listing = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if f"{pool}.default@{pool}-" in line]


def pool_manifest(redis_url: str, name: str, autoscaling: dict[str, Any], app_path: str) -> dict[str, Any]:
    return {
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "broker": {"url": redis_url},
            "queues": [name],
            "worker": {"app": app_path, "image": "local", "concurrency": 2},
            "autoscaling": {"pollSeconds": 1, **autoscaling},
        },
    }


@contextmanager
def local_command(
    manifest: dict[str, Any], tmp_path: Path, *options: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`local` on `manifest` in a child process, its output in a file (not a pipe: the live view
    must never block on a full pipe); yields the process and the file, and stops it with Ctrl-C."""
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(manifest))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "operator"), str(ROOT)]))
    command = [sys.executable, "-m", "celery_worker_operator.cli", "local", str(path), *options]
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        operator = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield operator, log
    finally:
        if operator.poll() is None:
            operator.send_signal(signal.SIGINT)
        try:
            operator.wait(timeout=60)
        except subprocess.TimeoutExpired:
            operator.kill()
            operator.wait()


def test_local_starts_workers_and_ctrl_c_stops_them_all(redis_url: str, tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    manifest = pool_manifest(redis_url, name, {"minReplicas": 2, "maxReplicas": 3}, "tests.support.local_app:app")
    with local_command(manifest, tmp_path, "--worker-log", str(tmp_path / "workers.log")) as (operator, log):
        wait_for(lambda: workers_of(name), lambda found: len(found) >= 2 or operator.poll() is not None, timeout=30)
        operator.send_signal(signal.SIGINT)
        operator.wait(timeout=60)
    output = log.read_text(errors="replace")
    assert operator.returncode == 0, output
    assert "stopping workers" in output
    assert workers_of(name) == [], "Ctrl-C left workers running"


def test_a_burst_logged_to_a_file_gives_plain_lines_every_decision_and_few_repeats(
    redis_url: str, tmp_path: Path
) -> None:
    name = f"burst-{uuid.uuid4().hex[:8]}"
    autoscaling = {
        "minReplicas": 0, "maxReplicas": 4, "targetWaitSeconds": 5, "taskDurationSeconds": 0.3,
        "scaleDown": {"stabilizationSeconds": 3},
    }  # fmt: skip
    manifest = pool_manifest(redis_url, name, autoscaling, "tests.support.local_app:app")
    broker = redis.Redis.from_url(redis_url)
    try:
        with local_command(manifest, tmp_path) as (operator, log):
            wait_for(log.read_text, lambda text: "Ctrl-C stops every worker" in text, timeout=30)
            app.conf.broker_url = redis_url
            with app.producer_or_acquire() as producer:
                for number in range(BURST):
                    record.apply_async((name, number, 0.3), queue=name, producer=producer)
            wait_for(lambda: broker.llen(f"{name}:ended"), lambda ended: ended >= BURST, timeout=180, interval=1)
            wait_for(log.read_text, lambda text: "ScaledDown" in text, timeout=60)
        assert operator.returncode == 0
    finally:
        broker.delete(name, f"{name}:started", f"{name}:ended")
    lines = log.read_text().splitlines()
    for line in lines:
        match = LINE.fullmatch(line)
        assert match, f"not a `time level logger message` line (wrapped?): {line!r}"
        assert not LEVEL.search(match.group(2)), f"level printed twice: {line!r}"
    assert max(len(line) for line in lines) > 80, "long lines are kept whole, not wrapped at 80 columns"
    steps = [(int(m.group(1)), int(m.group(2))) for line in lines if (m := DECISION.search(line))]
    assert steps and steps[0][0] == 0 and steps[-1][0] > steps[-1][1], steps
    assert all(one[1] == next_[0] for one, next_ in itertools.pairwise(steps)), f"a decision missing: {steps}"
    silent = Counter(m.group(1) for line in lines if (m := re.search(r"worker (\S+) of pool \S+ did not reply", line)))
    assert all(count <= 1 for count in silent.values()), silent


def ledger(broker: redis.Redis, name: str) -> tuple[Counter[int], Counter[int], int]:
    """Task numbers started and ended (the tasks' own records), and the messages still queued."""
    started, ended = (
        Counter(int(n) for n in broker.lrange(f"{name}:{which}", 0, -1)) for which in ("started", "ended")
    )
    return started, ended, int(broker.llen(name))


@contextmanager
def mid_burst(
    redis_url: str, tmp_path: Path, tasks: int, seconds: float
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`local` running a pool of 2-3 workers busy with a burst of `tasks` acks_late tasks of `seconds` each."""
    name = f"stop-{uuid.uuid4().hex[:8]}"
    autoscaling = {"minReplicas": 2, "maxReplicas": 3, "targetWaitSeconds": 5, "taskDurationSeconds": seconds}
    manifest = pool_manifest(redis_url, name, autoscaling, "tests.support.local_app:app")
    broker = redis.Redis.from_url(redis_url)
    try:
        with local_command(manifest, tmp_path) as (operator, _log):
            wait_for(lambda: workers_of(name), lambda found: len(found) >= 2 or operator.poll() is not None, 30)
            app.conf.broker_url = redis_url
            with app.producer_or_acquire() as producer:
                for number in range(tasks):
                    record.apply_async((name, number, seconds), queue=name, producer=producer)
            wait_for(lambda: ledger(broker, name)[0], lambda started: len(started) >= 4, timeout=60, interval=0.2)
            yield operator, name
    finally:
        broker.delete(name, f"{name}:started", f"{name}:ended")


def no_task_lost_or_cut_short(redis_url: str, name: str, tasks: int) -> None:
    started, ended, queued = ledger(redis.Redis.from_url(redis_url), name)
    assert started == ended, f"tasks cut short: {started - ended}"
    assert max(ended.values()) == 1, "a task ran twice"
    assert len(ended) + queued == tasks, f"lost: {tasks - len(ended) - queued} (ended {len(ended)}, queued {queued})"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_sigterm_and_sighup_mid_burst_stop_every_worker_within_the_grace_period_and_lose_no_task(
    redis_url: str, tmp_path: Path, sig: signal.Signals
) -> None:
    tasks, seconds = 60, 2.0
    with mid_burst(redis_url, tmp_path, tasks, seconds) as (operator, name):
        signalled = time.monotonic()
        operator.send_signal(sig)
        operator.wait(timeout=GRACE_SECONDS + 15)
        took = time.monotonic() - signalled
        assert operator.returncode == 0, f"exit code {operator.returncode}"
        assert workers_of(name) == [], f"{sig.name} left workers running"
        assert took < GRACE_SECONDS, f"stopped in {took:.0f} s, past the {GRACE_SECONDS} s grace period"
        no_task_lost_or_cut_short(redis_url, name, tasks)


def test_sigkill_of_local_leaves_no_worker_and_loses_no_task(redis_url: str, tmp_path: Path) -> None:
    tasks, seconds = 60, 2.0
    with mid_burst(redis_url, tmp_path, tasks, seconds) as (operator, name):
        operator.send_signal(signal.SIGKILL)
        operator.wait(timeout=10)
        wait_for(lambda: workers_of(name), lambda found: found == [], timeout=seconds + 10, interval=0.2)
        no_task_lost_or_cut_short(redis_url, name, tasks)
