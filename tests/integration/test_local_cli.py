"""`celery-worker-operator local` as a person runs it: workers come up, Ctrl-C stops every one of them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def workers_of(pool: str) -> list[str]:
    listing = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if f"{pool}@{pool}-" in line]


def test_local_starts_workers_and_ctrl_c_stops_them_all(redis_url: str, tmp_path: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    pool = {
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": name},
        "spec": {
            "broker": {"url": redis_url},
            "queues": [name],
            "worker": {"app": "tests.support.local_app:app", "image": "local", "concurrency": 2},
            "autoscaling": {"minReplicas": 2, "maxReplicas": 3, "pollSeconds": 1},
        },
    }
    manifest = tmp_path / "pool.yaml"
    manifest.write_text(yaml.safe_dump(pool))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "operator"), str(ROOT)]))
    command = [sys.executable, "-m", "celery_worker_operator.cli", "local", str(manifest), "--worker-log",
               str(tmp_path / "workers.log")]  # fmt: skip
    log = tmp_path / "operator.log"
    with log.open("wb") as out:  # a file, not a pipe: the live view must never block on a full pipe
        operator = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: workers_of(name), lambda found: len(found) >= 2 or operator.poll() is not None, timeout=30)
        operator.send_signal(signal.SIGINT)
        operator.wait(timeout=60)
    finally:
        if operator.poll() is None:
            operator.kill()
    output = log.read_text(errors="replace")
    assert operator.returncode == 0, output
    assert "stopping workers" in output
    assert workers_of(name) == [], "Ctrl-C left workers running"
