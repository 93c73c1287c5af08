"""promtool and a real Prometheus for the tests, built by `scripts/prometheus.sh` from the Go module
github.com/prometheus/prometheus (tools/prometheus) into `.prometheus/bin` (or ``CWO_PROMETHEUS_BIN``).

As with the control plane (tests/support/cluster.py): the binaries are built once after collection,
before the first test that asks for them (outside any test's timeout); without Go and without
binaries those tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import unavailable
from tests.support.operator_process import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "prometheus.sh"
BIN = Path(os.environ.get("CWO_PROMETHEUS_BIN") or ROOT / ".prometheus" / "bin")
FIXTURES = ("promtool", "prometheus_bin")

_build_error: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build promtool and prometheus before the first test that needs them, when Go is at hand."""
    global _build_error
    if session.config.option.collectonly:
        return
    if not any(set(FIXTURES) & set(getattr(item, "fixturenames", ())) for item in session.items):
        return
    if not shutil.which("go"):
        return
    capture = session.config.pluginmanager.get_plugin("capturemanager")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    if reporter is not None:
        reporter.write_line("prometheus: checking promtool and prometheus (a cold build takes minutes)")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        result = subprocess.run(["bash", str(SCRIPT), "ensure"], cwd=ROOT, check=False, timeout=3600)
    if result.returncode != 0:
        _build_error = f"scripts/prometheus.sh ensure failed (exit {result.returncode}); see its output above"
    elif reporter is not None:
        reporter.write_line(f"prometheus: binaries ready after {time.monotonic() - started:.0f} s")


def _binary(name: str) -> Path:
    if _build_error is not None:
        pytest.fail(_build_error)
    path = BIN / name
    if not path.is_file():
        unavailable(
            f"no {name} for the tests: install Go >= 1.26 (scripts/prometheus.sh builds it from tools/prometheus) "
            f"or put a built one in {BIN} (CWO_PROMETHEUS_BIN)"
        )
    return path


@pytest.fixture(scope="session")
def promtool() -> Path:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return _binary("prometheus")


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (empty when no series matches)."""
        return list(self.api("query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        return list(self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"])

    def target_health(self) -> list[str]:
        return [target["health"] for target in self.api("targets")["activeTargets"]]


@contextmanager
def running_prometheus(
    binary: Path, workdir: Path, scrape_port: int, rule_groups: list[dict[str, Any]], interval: str = "1s"
) -> Iterator[Prometheus]:
    """Prometheus scraping 127.0.0.1:`scrape_port` and evaluating `rule_groups`, every `interval`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(workdir / "rules.yaml")],
        "scrape_configs": [{"job_name": "operator", "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}]}],
    }
    (workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    command = [
        str(binary), f"--config.file={workdir / 'prometheus.yaml'}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_ready(prometheus, process)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _wait_ready(prometheus: Prometheus, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"Prometheus did not get ready:\n{prometheus.log_path.read_text()[-3000:]}")
        time.sleep(0.2)
