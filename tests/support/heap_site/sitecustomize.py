"""Heap snapshots of a process under test, asked for from outside; Python imports this module at
start-up when its directory is on PYTHONPATH (`tests.support.heap.traced_env` puts it there for the
operator's process only, never for the product).

With CWO_HEAP_SNAPSHOTS=DIR set it starts a daemon thread that, for every `NAME.request` file
appearing in DIR, collects garbage and writes `NAME.snapshot` (tracemalloc's own dump format), or
`NAME.error` with the traceback, and removes the request: the test compares the live Python-level
heap between two moments without any hook in the operator's code. Tracing (CWO_HEAP_FRAMES frames
per allocation) starts with the first request, not at start-up: what is allocated before it
(imports, the warm-up the test waits out) is never traced, and start-up under tracemalloc is
several times slower.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import traceback
import tracemalloc
from pathlib import Path

POLL_SECONDS = 0.2


def _snapshot(request: Path) -> None:
    if not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ.get("CWO_HEAP_FRAMES", "8")))
    gc.collect()  # garbage awaiting the cycle collector is no leak
    partial = request.with_suffix(".partial")
    tracemalloc.take_snapshot().dump(str(partial))
    partial.rename(request.with_suffix(".snapshot"))  # whole or absent, never half written


def _answer_requests(directory: Path) -> None:
    while True:
        for request in sorted(directory.glob("*.request")):
            try:
                _snapshot(request)
            except Exception:  # reported to the test, which would otherwise wait for nothing
                request.with_suffix(".error").write_text(traceback.format_exc())
            request.unlink()
        time.sleep(POLL_SECONDS)


if os.environ.get("CWO_HEAP_SNAPSHOTS"):
    directory = Path(os.environ["CWO_HEAP_SNAPSHOTS"])
    threading.Thread(target=_answer_requests, args=(directory,), name="heap-snapshots", daemon=True).start()
