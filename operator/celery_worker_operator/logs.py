"""Log lines that read well wherever they go: a terminal, a file, a pipe, a log collector.

On a terminal `local` and `demo` print through rich, above their live view. Anywhere else a line
is `time level logger message`, one record per line, never wrapped (rich wraps at 80 columns
when it cannot see a terminal); `json` gives one object per line for machines. Warnings that
repeat (a busy worker missing a control reply every pass) pass once per `REPEAT_SECONDS` for
the same logger, message and arguments; the next one that passes says how many were held back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["auto", "text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"  # local time, one word: every field of a line is split on spaces
REPEAT_SECONDS = 300.0  # a repeated warning passes once per this long (per logger, message, arguments)
MAX_REMEMBERED = 10_000  # repeated-warning keys kept; beyond it the stale ones are forgotten


@dataclass
class _Seen:
    since: float  # when this warning last passed
    held: int = 0  # how many times it came again since, and was held back


class RepeatFilter(logging.Filter):
    """Lets a warning (or worse) through once per `every` seconds per logger, message template and
    arguments: a message naming a worker is thereby limited per worker. Lower levels always pass."""

    def __init__(self, every: float = REPEAT_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every, self.clock = every, clock
        self._seen: dict[tuple[str, str, str], _Seen] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key, now = (record.name, str(record.msg), repr(record.args)), self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.since < self.every:
            seen.held += 1
            return False
        if seen is not None and seen.held:
            record.msg = f"{record.msg} (and {seen.held} more times in the last {(now - seen.since) / 60:.0f} min)"
        self._seen[key] = _Seen(now)
        if len(self._seen) > MAX_REMEMBERED:
            self._seen = {k: s for k, s in self._seen.items() if now - s.since < self.every}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(log_format: LogFormat, level: str | int, console: Any = None) -> bool:
    """Route every log record to stderr in `log_format`; `auto` means rich on a terminal (through
    `console`, a rich Console, so lines land above a live view), plain text anywhere else.

    Returns True when rich prints the lines: then a live view can be shown too."""
    rich = log_format == "auto" and console is not None and console.is_terminal
    handler: logging.Handler
    if rich:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s %(message)s"))  # rich shows time and level itself
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT, TIME_FORMAT))
    handler.addFilter(RepeatFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return rich
