"""`celery-worker-operator demo` as `make demo` runs it: to its summary, in time, leaving nothing behind."""

from __future__ import annotations

import subprocess
import sys
import time


def celery_demo_processes() -> list[str]:
    listing = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if "celery_worker_operator.demo.app" in line]


def test_demo_runs_to_its_summary_within_three_minutes(redis_url: str) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "celery_worker_operator.cli", "demo", "--broker", redis_url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 180
    lines = done.stdout
    assert "tasks done        120 of 120" in lines
    assert "p95 wait" in lines
    assert "back to 0" in lines
    assert celery_demo_processes() == [], "the demo left workers running"
