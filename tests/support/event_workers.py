"""Real `celery worker` processes for the telemetry tests, each in its own process group.

Workers run the app in tests/support/event_app.py with a short heartbeat interval, so liveness
tests finish in seconds. `Workers` kills every process group it started, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll `probe` until it returns something truthy; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout} s (last: {value!r})"
            return value
        time.sleep(interval)


class Workers:
    """Starts celery workers on one broker and kills them all (process groups, SIGKILL) on close."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = tempfile.TemporaryDirectory(prefix="cwo-workers-")

    def start(self, hostname: str, queue: str, *, events: bool = True, heartbeat: int = 1) -> str:
        """Start `celery worker -n hostname -Q queue -c 2`; returns the hostname."""
        command = [sys.executable, "-m", "celery", "-A", "tests.support.event_app", "worker", "-n", hostname]
        command += ["-E"] if events else []
        command += ["-c", "2", "-Q", queue, "--without-mingle", "--without-gossip", "-l", "warning"]
        command += ["--heartbeat-interval", str(heartbeat)]
        env = dict(os.environ, CWO_EVENTS_BROKER=self.broker_url)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT), env.get("PYTHONPATH", "")])
        log = Path(self._logs.name, f"{hostname}.log").open("wb")  # noqa: SIM115 - lives as long as the worker
        self.processes[hostname] = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return hostname

    def kill(self, hostname: str) -> None:
        """kill -9 the worker and its pool children, as a node loss would."""
        process = self.processes.pop(hostname)
        _kill_group(process)

    def log(self, hostname: str) -> str:
        return Path(self._logs.name, f"{hostname}.log").read_text(errors="replace")

    def close(self) -> None:
        for process in self.processes.values():
            _kill_group(process)
        self.processes.clear()
        self._logs.cleanup()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
