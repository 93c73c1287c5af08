"""Test tools built from a Go module pinned in tools/<name> by `scripts/<name>.sh` (Prometheus, Helm),
as the control plane is built (tests.support.cluster).

Each is built once after collection, before the first test that asks for one of its fixtures (outside
any test's timeout, its output shown); a second run finds it up to date in seconds. Without Go and
without a built binary the tests skip with the reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cluster import unavailable

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class GoTool:
    """`scripts/<name>.sh ensure` builds `binaries` into `.<name>/bin`, or into the folder `bin_env` names."""

    name: str
    binaries: tuple[str, ...]
    fixtures: tuple[str, ...]  # the fixtures that need the binaries: only their tests trigger a build
    bin_env: str
    build_error: str | None = field(default=None, init=False)

    @property
    def bin_dir(self) -> Path:
        return Path(os.environ.get(self.bin_env) or ROOT / f".{self.name}" / "bin")

    def ensure_before_tests(self, session: pytest.Session) -> None:
        """The `pytest_collection_finish` part: build (or find up to date) when a collected test needs it."""
        if session.config.option.collectonly or not shutil.which("go"):
            return
        if not any(set(self.fixtures) & set(getattr(item, "fixturenames", ())) for item in session.items):
            return
        capture = session.config.pluginmanager.get_plugin("capturemanager")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        started = time.monotonic()
        if reporter is not None:
            reporter.write_line(f"{self.name}: checking {', '.join(self.binaries)} (a cold build takes minutes)")
        script = ROOT / "scripts" / f"{self.name}.sh"
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            result = subprocess.run(["bash", str(script), "ensure"], cwd=ROOT, check=False, timeout=3600)
        if result.returncode != 0:
            self.build_error = f"scripts/{self.name}.sh ensure failed (exit {result.returncode}); see its output above"
        elif reporter is not None:
            reporter.write_line(f"{self.name}: ready after {time.monotonic() - started:.0f} s")

    def binary(self, name: str) -> Path:
        """The built binary, or the test skips (fails under CI=true) saying why there is none."""
        if self.build_error is not None:
            pytest.fail(self.build_error)
        path = self.bin_dir / name
        if not path.is_file():
            unavailable(
                f"no {name} for the tests: install Go >= 1.26 (scripts/{self.name}.sh builds it from "
                f"tools/{self.name}) or put a built one in {self.bin_dir} ({self.bin_env})"
            )
        return path
