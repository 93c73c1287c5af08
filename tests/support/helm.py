"""The `helm` CLI for the tests, built by `scripts/helm.sh` from the Go module helm.sh/helm/v4
(tools/helm) into `.helm/bin` (or ``CWO_HELM_BIN``), once after collection and only when a test needs
it (tests.support.go_tool); and `Helm`, which runs it against the tests' control plane.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cluster import Cluster
from tests.support.go_tool import GoTool

HELM = GoTool("helm", ("helm",), ("helm_bin",), "CWO_HELM_BIN")


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return HELM.binary("helm")


@dataclass
class Helm:
    """`helm` with the cluster's admin kubeconfig and its own home, cache, config and data folders."""

    binary: Path
    cluster: Cluster
    home: Path

    def __call__(self, *args: str, timeout: float = 180) -> str:
        """Run `helm ARGS`; its output, or an AssertionError carrying it when helm fails."""
        result = self.run(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result.stdout

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "HOME": str(self.home),  # its Kubernetes client's discovery cache: ~/.kube/cache
            "PATH": "/usr/bin:/bin",
        }
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def values_file(self, values: dict[str, Any], name: str = "values.yaml") -> str:
        path = self.home / name
        path.write_text(yaml.safe_dump(values))
        return str(path)

    def status(self, release: str, namespace: str) -> dict[str, Any]:
        return dict(json.loads(self("status", release, "-n", namespace, "-o", "json")))
