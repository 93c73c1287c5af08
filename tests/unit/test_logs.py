"""Log lines: plain or JSON off a terminal, repeated warnings held back with a count."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest

from celery_worker_operator.logs import RepeatFilter, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def record(message: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("cwo.test", level, __file__, 1, message, args, None)


def test_a_repeated_warning_passes_once_per_period_per_argument_then_says_how_many_were_held() -> None:
    clock = Clock()
    repeats = RepeatFilter(every=300, clock=clock)
    template = "worker %s did not reply"
    assert repeats.filter(record(template, "w1"))
    assert repeats.filter(record(template, "w2")), "another worker is another warning"
    clock.now += 10
    assert not any(repeats.filter(record(template, "w1")) for _ in range(5))
    clock.now += 300
    again = record(template, "w1")
    assert repeats.filter(again)
    assert again.getMessage() == "worker w1 did not reply (and 5 more times in the last 5 min)"


def test_info_lines_are_never_held_back() -> None:
    repeats = RepeatFilter(every=300, clock=Clock())
    assert all(repeats.filter(record("scaled %s", 1, level=logging.INFO)) for _ in range(3))


def test_text_lines_off_a_terminal_are_time_level_logger_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert configure_logging("auto", "INFO") is False
    logging.getLogger("cwo.test").warning("worker %s exited with %d", "typo-1", 2)
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} WARNING cwo\.test worker typo-1 exited with 2", line)


def test_json_lines_carry_level_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "DEBUG")
    logging.getLogger("cwo.test").info("pool %s ScaledUp", "default/orders")
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "cwo.test", "pool default/orders ScaledUp")
    assert line["time"].endswith("+00:00")


def test_the_level_option_drops_lower_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("text", "WARNING")
    logging.getLogger("cwo.test").info("not shown")
    assert capsys.readouterr().err == ""
