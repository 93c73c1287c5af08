"""Tasks the control-broadcast tests run on real workers (`-A tests.support.control_app`).

The broker comes from CWO_TEST_BROKER_URL, like `celery_app`. Tasks leave their evidence in a file
the test names (one line per start and end, with the worker's clock), so a test can see spacing
(rate limits) and a task that never finished (hard time limits) without a result backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.support.celery_app import BROKER_ENV, make_app

RECORD = "cwo.control.record"
DECLARED = "cwo.control.declared"
DECLARED_RATE = "100/m"  # the code default `DECLARED` comes with, which a reset must restore
Record = tuple[str, str, float]  # (event, label, worker clock)

app = make_app(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/15"))


@app.task(name=RECORD)
def record(path: str, label: str, seconds: float = 0.0) -> None:
    """Append `start <label> <time>`, sleep, append `end <label> <time>`."""
    log = Path(path)
    with log.open("a") as out:
        out.write(f"start {label} {time.time()}\n")
    time.sleep(seconds)
    with log.open("a") as out:
        out.write(f"end {label} {time.time()}\n")


@app.task(name=DECLARED, rate_limit=DECLARED_RATE)
def declared() -> None:
    """A task whose rate limit is declared in code, as `@app.task(rate_limit=...)` users do."""


def read_records(path: Path) -> list[Record]:
    """The (event, label, time) lines tasks wrote to `path`, oldest first; none yet is an empty list."""
    if not path.exists():
        return []
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return [(event, label, float(stamp)) for event, label, stamp in rows]
