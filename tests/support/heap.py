"""Python-level heap of the operator's process between two moments, to tell a leak (objects kept
per pool or per broker) from the allocator's own growth (RSS that no live Python object explains).

`traced_env(directory)` is the environment that makes a Python process answer snapshot requests
(see heap_site/sitecustomize.py); `HeapSnapshots.take(name)` asks and loads the answer.
"""

from __future__ import annotations

import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import wait_for

SITE = Path(__file__).with_name("heap_site")
IGNORED = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*"))


def traced_env(directory: Path, frames: int = 8) -> dict[str, str]:
    """Environment additions for a process whose heap `HeapSnapshots(directory)` will read."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CWO_HEAP_SNAPSHOTS": str(directory), "CWO_HEAP_FRAMES": str(frames)}


@dataclass(frozen=True)
class HeapSnapshots:
    directory: Path

    def take(self, name: str, timeout: float = 120.0) -> tracemalloc.Snapshot:
        """The process's live allocations now (Python objects and buffers, not freed memory) made since
        the first `take`, which starts tracing: its snapshot is (nearly) empty."""
        answer, error = self.directory / f"{name}.snapshot", self.directory / f"{name}.error"
        (self.directory / f"{name}.request").touch()
        wait_for(lambda: answer.exists() or error.exists(), bool, timeout=timeout, interval=0.2)
        if error.exists():
            raise RuntimeError(f"no heap snapshot {name}:\n{error.read_text()}")
        return tracemalloc.Snapshot.load(str(answer)).filter_traces(IGNORED)


def traced_kib(snapshot: tracemalloc.Snapshot) -> int:
    return sum(stat.size for stat in snapshot.statistics("filename")) // 1024


def growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int = 12) -> str:
    """The `top` allocation sites (by their whole traceback) that grew most, printable."""
    lines = []
    for stat in after.compare_to(before, "traceback")[:top]:
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB, {stat.count_diff:+d} blocks (now {stat.size / 1024:.1f} KiB)")
        lines.extend(f"    {line}" for line in stat.traceback.format(limit=8, most_recent_first=True))
    return "\n".join(lines)
