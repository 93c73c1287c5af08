"""The pure core stays pure: policy, simulator, spec and telemetry's aggregator import nothing that does I/O.

The layers themselves (edges -> loop -> adapters -> core) are import-linter contracts in .importlinter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "celery_worker_operator"
PURE = [
    "spec.py",
    "crd.py",
    "policy.py",
    "units.py",
    "naming.py",
    "startup.py",
    "template_policy.py",
    "status_view.py",
    "simulation/engine.py",
    "simulation/baselines.py",
    "simulation/scenarios.py",
    "telemetry/model.py",
    "telemetry/window.py",
    "telemetry/aggregator.py",
]
IO_MODULES = {
    "celery",
    "kombu",
    "redis",
    "pika",
    "kopf",
    "kubernetes",
    "prometheus_client",
    "socket",
    "subprocess",
    "threading",
    "asyncio",
    "urllib",
    "http",
    "requests",
    "os",
    "time",
}
ADAPTERS = {
    "brokers",
    "telemetry",
    "monitor",
    "control",
    "workloads",
    "secrets",
    "reconciler",
    "pool_loop",
    "kube",
    "handlers",
    "localmode",
    "metrics",
    "cli",
    "charts",
    "demo",
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(("." if node.level else "") + (node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    names = imported(PACKAGE / module)
    assert not names & IO_MODULES, f"{module} imports I/O: {names & IO_MODULES}"
    assert not {n.lstrip(".") for n in names if n.startswith(".")} & ADAPTERS, f"{module} imports an adapter"
