"""promtool and a real Prometheus for the tests, built by `scripts/prometheus.sh` from the Go module
github.com/prometheus/prometheus (tools/prometheus) into `.prometheus/bin` (or ``CWO_PROMETHEUS_BIN``),
once after collection and only when a test needs them (tests.support.go_tool).
"""

from __future__ import annotations

import json
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

from tests.support.go_tool import GoTool
from tests.support.operator_process import free_port

PROMETHEUS = GoTool("prometheus", ("promtool", "prometheus"), ("promtool", "prometheus_bin"), "CWO_PROMETHEUS_BIN")


@pytest.fixture(scope="session")
def promtool() -> Path:
    return PROMETHEUS.binary("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return PROMETHEUS.binary("prometheus")


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
