"""`celery-worker-operator local` as a person runs it: workers come up, Ctrl-C stops every one of them,
and with its output in a file it writes plain log lines, one per scale decision."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml

from tests.support.local_app import app, record
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ (.+)")
LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
DECISION = re.compile(r"Scaled(?:Up|Down): scale (?:up|down) (\d+) -> (\d+)")
BURST = 200


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
