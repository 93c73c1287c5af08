"""Real `celery worker` subprocesses for integration tests, for any test app module.

Each worker runs in its own process group, named `<pool>@<name>` as the operator names them, with
its output in a temp file for failure messages. `CeleryWorkers` kills every group it started on
close, whatever the test did; use it as a context manager inside a fixture. Should the test run be
killed, the kernel kills them (a parent-death signal): start them from the test's own thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from celery import Celery

from celery_worker_operator.workloads.lifeline import die_with_parent

ROOT = Path(__file__).resolve().parents[2]


class CeleryWorkers:
    """Starts `python -m celery -A <app_module> worker ...` processes on one broker."""

    def __init__(self, app_module: str, broker_url: str, broker_env: str = "CWO_TEST_BROKER_URL") -> None:
        self.app_module, self.broker_url, self.broker_env = app_module, broker_url, broker_env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = tempfile.TemporaryDirectory(prefix="cwo-celery-")

    def start(
        self,
        hostname: str,
        queues: Sequence[str],
        *,
        concurrency: int = 1,
        prefetch_multiplier: int = 4,
        settings: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> str:
        """Start one worker (`hostname` like `pool@name`); `settings` become trailing key=value args."""
        command = [sys.executable, "-m", "celery", "-A", self.app_module, "worker", "-n", hostname]
        command += ["-c", str(concurrency), "--prefetch-multiplier", str(prefetch_multiplier), "-Q", ",".join(queues)]
        command += ["--without-mingle", "--without-gossip", "-l", "warning", *extra_args]
        command += [f"{key}={value}" for key, value in (settings or {}).items()]
        env = dict(os.environ, **{self.broker_env: self.broker_url})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "operator"), str(ROOT), env.get("PYTHONPATH")]))
        with self._log_path(hostname).open("wb") as log:  # the child keeps its own copy of the descriptor
            self.processes[hostname] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),  # a killed test run leaves no worker behind
            )
        return hostname

    def wait_ready(self, app: Celery, hostname: str, timeout: float = 45.0) -> None:
        """Block until the worker answers a ping; fail with its log if it dies or stays silent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[hostname].poll() is not None:
                raise AssertionError(f"worker {hostname} exited:\n{self.log(hostname)}")
            if app.control.ping(destination=[hostname], timeout=0.5):
                return
        raise AssertionError(f"worker {hostname} did not answer a ping within {timeout} s:\n{self.log(hostname)}")

    def stop(self, hostname: str) -> None:
        """kill -9 the worker and its pool children (a lost node; no chance to requeue anything)."""
        process = self.processes.pop(hostname)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def pause(self, hostname: str) -> None:
        """SIGSTOP the worker's process group: alive and connected, but answering nothing (a frozen node)."""
        os.killpg(self.processes[hostname].pid, signal.SIGSTOP)

    def resume(self, hostname: str) -> None:
        """SIGCONT a paused worker; it then handles what it was sent meanwhile."""
        os.killpg(self.processes[hostname].pid, signal.SIGCONT)

    def log(self, hostname: str) -> str:
        return self._log_path(hostname).read_text(errors="replace")

    def close(self) -> None:
        for hostname in list(self.processes):
            self.stop(hostname)
        self._logs.cleanup()

    def __enter__(self) -> CeleryWorkers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _log_path(self, hostname: str) -> Path:
        return Path(self._logs.name, f"{hostname.replace('/', '_')}.log")
