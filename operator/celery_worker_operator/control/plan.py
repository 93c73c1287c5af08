"""PURE: what each worker of a pool must be told so that it matches the pool's spec.

Celery keeps `rate_limit`, `time_limit` and consumer changes in each worker's memory only, so the
operator compares what every worker reports with what the spec wants and sends only the difference.
This module holds that comparison and nothing that does I/O: the adapter in `controller.py`
gathers `WorkerSettings`, calls `plan_convergence`, sends the `Command`s and reports the replies.

Resetting. Removing a limit from the spec restores the task's *default*: the value workers
reported before the operator first changed that task (what `@app.task(rate_limit=...)` or
`task_default_rate_limit` gave it), learned from the workers and carried from pass to pass in
`Defaults`. Celery reports only current values and has no command that restores the declared
ones, so a default the operator never saw (it started after the change) resets to "no per-task
limit" (`rate_limit None`; `time_limit` None/None, where the worker-wide `task_time_limit` applies).

Time limits. A worker snapshots each task's time limits when it builds its task strategies (at
start and on reconnect: `create_request_cls` in celery/worker/request.py), so a `time_limit`
broadcast changes what `registered` reports but is enforced only from the worker's next start.
Workers should therefore start with them (`worker_start_settings`); a broadcast to a running
worker is still sent, and reported as pending a restart.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from ..spec import QUEUE_NAME, RATE, TASK_NAME, CeleryWorkerPoolSpec
from ..units import per_second

CommandName = Literal["add_consumer", "rate_limit", "time_limit", "cancel_consumer"]
MAX_MESSAGE = 4000  # a condition message stays readable in `kubectl describe`


@dataclass(frozen=True)
class TimeLimits:
    """Soft and hard time limits in seconds; None for either means no per-task limit of that kind."""

    soft: float | None = None
    hard: float | None = None

    def __str__(self) -> str:
        return f"soft={_number(self.soft)} hard={_number(self.hard)}"


NO_TIME_LIMITS = TimeLimits()
LimitValue = str | TimeLimits | None  # a rate such as "6/m" (None: no rate limit), or time limits


@dataclass(frozen=True)
class PoolSettings:
    """What every worker of a pool should have: its queues and per-task limits.

    An empty `queues` leaves consumer routing alone (never cancel every queue of a worker).
    """

    queues: frozenset[str]
    rate_limits: Mapping[str, str] = field(default_factory=dict)
    time_limits: Mapping[str, TimeLimits] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: CeleryWorkerPoolSpec) -> PoolSettings:
        return cls(
            queues=frozenset(spec.queues),
            rate_limits=dict(spec.limits.rate_limits),
            time_limits={task: TimeLimits(t.soft, t.hard) for task, t in spec.limits.time_limits.items()},
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker reports: the queues it consumes, its tasks, and the limits set on them."""

    queues: frozenset[str]
    tasks: frozenset[str]
    rate_limits: Mapping[str, str] = field(default_factory=dict)
    time_limits: Mapping[str, TimeLimits] = field(default_factory=dict)


@dataclass(frozen=True)
class Defaults:
    """Per task, the limit workers had before the operator first changed it: what a reset restores."""

    rate_limits: Mapping[str, LimitValue] = field(default_factory=dict)
    time_limits: Mapping[str, LimitValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """One control command for the workers in `destination`; `subject` is a task or a queue name."""

    name: CommandName
    subject: str
    value: LimitValue
    destination: tuple[str, ...]

    @property
    def arguments(self) -> dict[str, Any]:
        """The keyword arguments Celery's handler of `name` takes (celery/worker/control.py)."""
        if self.name == "rate_limit":
            return {"task_name": self.subject, "rate_limit": self.value}
        if self.name == "time_limit":
            limits = self.value if isinstance(self.value, TimeLimits) else NO_TIME_LIMITS
            return {"task_name": self.subject, "soft": limits.soft, "hard": limits.hard}
        return {"queue": self.subject}

    def __str__(self) -> str:
        if self.name in ("add_consumer", "cancel_consumer"):
            return f"{self.name} {self.subject}"
        return f"{self.name} {self.subject} {'none' if self.value is None else self.value}"


class Outcome(NamedTuple):
    """A line of a report: which worker (None: the spec itself) and what happened."""

    worker: str | None
    message: str


@dataclass(frozen=True)
class Plan:
    commands: tuple[Command, ...]
    unknown: tuple[Outcome, ...]  # limits for tasks a worker does not register: not sent, reported
    defaults: Defaults  # the learned defaults to hand to the next pass


class Condition(NamedTuple):
    """The `LimitsApplied` condition: status "True" / "False" / "Unknown", a CamelCase reason, a message."""

    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str


# --- validation -------------------------------------------------------------------------------


def validate(desired: PoolSettings) -> tuple[PoolSettings, tuple[Outcome, ...]]:
    """The valid part of `desired`, and one line per entry left out; nothing invalid is ever sent.

    The CRD schema checks the same patterns, but pools also arrive from local YAML and older CRDs,
    and a worker answers a bad unit with a bare `KeyError('x')`, so they are checked again here.
    """
    problems: list[str] = []
    queues = {q for q in desired.queues if _check(problems, re.match(QUEUE_NAME, q), f"queue {q!r}: not a queue name")}
    rates = {
        task: value
        for task, value in desired.rate_limits.items()
        if _task_ok(problems, task, "rate limit") and _check(problems, *_rate_problem(task, value))
    }
    times = {
        task: value
        for task, value in desired.time_limits.items()
        if _task_ok(problems, task, "time limit") and _check(problems, *_time_problem(task, value))
    }
    if desired.queues and not queues:
        problems.append("no valid queue: consumer routing left as it is")
    valid = PoolSettings(frozenset(queues), rates, times)
    return valid, tuple(Outcome(None, problem) for problem in problems)


def _check(problems: list[str], ok: object, problem: str) -> bool:
    if not ok:
        problems.append(problem)
    return bool(ok)


def _task_ok(problems: list[str], task: str, what: str) -> bool:
    return _check(problems, re.match(TASK_NAME, task), f"{what} for {task!r}: not a task name")


def _rate_problem(task: str, value: str) -> tuple[bool, str]:
    # Celery reads a zero rate as "no limit", the opposite of what "0/m" seems to ask for.
    if isinstance(value, str) and re.fullmatch(r"0+(\.0+)?/[smh]", value):
        return False, f"rate limit {value!r} for {task}: zero means unlimited to Celery; remove it"
    return isinstance(value, str) and re.match(RATE, value) is not None, (
        f"rate limit {value!r} for {task}: not N/s, N/m or N/h"
    )


def _time_problem(task: str, value: TimeLimits) -> tuple[bool, str]:
    bounds = [v for v in (value.soft, value.hard) if v is not None]
    ordered = value.soft is None or value.hard is None or value.soft < value.hard
    return (
        bool(bounds) and all(v > 0 for v in bounds) and ordered,
        f"time limit {value} for {task}: set soft, hard or both, positive, soft < hard",
    )


def worker_start_settings(desired: PoolSettings) -> dict[str, str]:
    """Trailing `key=value` worker arguments that start workers with the pool's time limits enforced.

    For the workload builders: `celery worker ... task_annotations=(json){...}`. It replaces any
    `task_annotations` of the app's own config, and a change of it changes the pod template, which
    restarts the workers, the only way Celery enforces a new time limit.
    """
    annotations = {
        task: {key: value for key, value in (("soft_time_limit", t.soft), ("time_limit", t.hard)) if value is not None}
        for task, t in sorted(validate(desired)[0].time_limits.items())
    }
    return {"task_annotations": "(json)" + json.dumps(annotations, sort_keys=True)} if annotations else {}


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    """One kind of per-task limit: where it lives in the settings, its "none", how values compare."""

    command: Literal["rate_limit", "time_limit"]
    values: Callable[[PoolSettings | WorkerSettings | Defaults], Mapping[str, LimitValue]]
    none: LimitValue
    same: Callable[[LimitValue, LimitValue], bool]


def _same_rate(a: LimitValue, b: LimitValue) -> bool:
    """Equal rates in any spelling ("60/m" == "1/s"); a rate of zero is no limit, like None."""
    return per_second(a if isinstance(a, str) else None) == per_second(b if isinstance(b, str) else None)


KINDS = (
    _Kind("rate_limit", lambda s: s.rate_limits, None, _same_rate),
    _Kind("time_limit", lambda s: s.time_limits, NO_TIME_LIMITS, lambda a, b: a == b),
)


def plan_convergence(
    desired: PoolSettings, observed: Mapping[str, WorkerSettings], defaults: Defaults | None = None
) -> Plan:
    """The commands that bring every observed worker to `desired` (already validated).

    Only differences are sent, each to exactly the workers that need it; identical changes are
    grouped into one broadcast. Queues are added before any is cancelled, so a worker never
    stands without one. Limits for a task a worker does not register are reported, not sent.
    """
    defaults = defaults or Defaults()
    wanted: dict[tuple[CommandName, str, LimitValue], list[str]] = defaultdict(list)
    unknown: list[Outcome] = []
    learned: dict[str, dict[str, LimitValue]] = {}
    for kind in KINDS:
        want = kind.values(desired)
        learned[kind.command] = known = _learn(kind, want, kind.values(defaults), observed)
        targets = {**{t: v for t, v in known.items() if t not in want}, **want}
        for worker, settings in sorted(observed.items()):
            have = kind.values(settings)
            for task, target in sorted(targets.items()):
                if task not in settings.tasks:
                    if task in want:
                        unknown.append(Outcome(worker, f"{kind.command} {task}: unknown task (not registered)"))
                elif not kind.same(have.get(task, kind.none), target):
                    wanted[(kind.command, task, target)].append(worker)
    if desired.queues:
        for worker, settings in sorted(observed.items()):
            for queue in sorted(desired.queues - settings.queues):
                wanted[("add_consumer", queue, None)].append(worker)
            for queue in sorted(settings.queues - desired.queues):
                wanted[("cancel_consumer", queue, None)].append(worker)
    commands = [Command(name, subject, value, tuple(workers)) for (name, subject, value), workers in wanted.items()]
    order = {"add_consumer": 0, "rate_limit": 1, "time_limit": 1, "cancel_consumer": 2}
    commands.sort(key=lambda c: order[c.name])
    next_defaults = Defaults(
        rate_limits=_still_restoring(KINDS[0], learned["rate_limit"], desired, observed),
        time_limits=_still_restoring(KINDS[1], learned["time_limit"], desired, observed),
    )
    return Plan(tuple(commands), tuple(unknown), next_defaults)


def _learn(
    kind: _Kind,
    want: Mapping[str, LimitValue],
    known: Mapping[str, LimitValue],
    observed: Mapping[str, WorkerSettings],
) -> dict[str, LimitValue]:
    """`known` defaults plus, for each newly limited task, what the workers run it with now.

    The most common value among workers that differ from the spec is the default; when all
    already match (the operator restarted after applying it), the true default is gone: none.
    """
    learned = dict(known)
    for task, target in want.items():
        carriers = [s for s in observed.values() if task in s.tasks]
        if task in learned or not carriers:
            continue
        values = [kind.values(s).get(task, kind.none) for s in carriers]
        differing = Counter(v for v in values if not kind.same(v, target))
        learned[task] = differing.most_common(1)[0][0] if differing else kind.none
    return learned


def _still_restoring(
    kind: _Kind, learned: Mapping[str, LimitValue], desired: PoolSettings, observed: Mapping[str, WorkerSettings]
) -> dict[str, LimitValue]:
    """Defaults still needed: tasks still limited, and removed ones some worker has not got back yet."""
    want = kind.values(desired)
    return {
        task: default
        for task, default in learned.items()
        if task in want
        or not observed
        or any(
            task in s.tasks and not kind.same(kind.values(s).get(task, kind.none), default) for s in observed.values()
        )
    }


# --- reporting --------------------------------------------------------------------------------


def limits_condition(
    workers: Iterable[str], errors: Iterable[Outcome], unreachable: Iterable[str], restart_pending: Iterable[str] = ()
) -> Condition:
    """`LimitsApplied`: False with the first kind of trouble as reason and every line as message.

    Reasons: InvalidLimits (spec entries not sent), WorkerErrors (a worker refused or lacks the
    task), WorkersUnreachable (no reply after retries), RestartPending (running workers were sent
    time limits, which Celery enforces from their next start); True: Applied, or NoWorkers when
    the pool has none running (new ones get the settings on the first pass that finds them).
    """
    errors, silent, found = list(errors), sorted(unreachable), sorted(workers)
    pending = sorted(restart_pending)
    lines = [f"{worker}: {message}" if worker else f"spec: {message}" for worker, message in errors]
    lines += [f"{worker}: no reply (retried with backoff)" for worker in silent]
    if any(worker is None for worker, _ in errors):
        return Condition("False", "InvalidLimits", _joined(lines))
    if errors:
        return Condition("False", "WorkerErrors", _joined(lines))
    if silent:
        return Condition("False", "WorkersUnreachable", _joined(lines))
    if pending:
        return Condition(
            "False",
            "RestartPending",
            f"time limits were changed on running workers; Celery enforces them from a worker's next start: "
            f"{', '.join(pending)}",
        )
    if not found:
        return Condition("True", "NoWorkers", "no worker of the pool is running; settings apply when one starts")
    return Condition("True", "Applied", f"queues and limits match the spec on {len(found)} worker(s)")


def _joined(lines: list[str]) -> str:
    text = "; ".join(lines)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 16] + f"... ({len(lines)} lines)"


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"
