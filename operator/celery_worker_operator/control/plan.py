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

Pool rate limits. Celery's rate limits are per worker, so a pool-wide rate is split: every live
worker gets rate / live workers, the remainder spread one by one over the first workers by name,
in the rate's own unit when the shares are whole numbers there, else in a longer unit (60/m over 7
workers: 9/m on 4 and 8/m on 3; 5/m over 6: 50/h each). A share is never 0, which Celery reads as
no limit. The split follows the pass's workers, so every membership change re-sends the shares.

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
from ..units import RATE_UNITS, per_second

CommandName = Literal["add_consumer", "rate_limit", "time_limit", "cancel_consumer"]
MAX_MESSAGE = 4000  # a condition message stays readable in `kubectl describe`
MIN_SHARE_PER_HOUR = 0.000001  # a share too small to print is rounded up to this, never down to "no limit"


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
    pool_rate_limits: Mapping[str, str] = field(default_factory=dict)  # task -> rate for all workers together
    most_workers: int = 1  # the largest the pool may grow: a new worker starts with the share at that size
    expected_workers: int = 0  # workers the pool runs or is starting now: pool rates are split at least this many ways

    @classmethod
    def from_spec(cls, spec: CeleryWorkerPoolSpec) -> PoolSettings:
        return cls(
            queues=frozenset(spec.queues),
            rate_limits=dict(spec.limits.rate_limits),
            time_limits={task: TimeLimits(t.soft, t.hard) for task, t in spec.limits.time_limits.items()},
            pool_rate_limits=dict(spec.limits.pool_rate_limits),
            most_workers=max(spec.autoscaling.max_replicas, spec.replicas or 0),
        )

    @property
    def start_shares(self) -> dict[str, str]:
        """The rate a new worker starts with for each pool-limited task: its share were the pool at its
        largest, so that, until the next pass tells it its real share, the pool stays under its rate."""
        return {task: split_rate(rate, self.most_workers)[-1] for task, rate in self.pool_rate_limits.items()}


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker reports: the queues it consumes, its tasks, and the limits set on them."""

    queues: frozenset[str]
    tasks: frozenset[str]
    rate_limits: Mapping[str, str] = field(default_factory=dict)
    time_limits: Mapping[str, TimeLimits] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerStats:
    """What one worker's `inspect stats` and `inspect conf` say of its health; None where they do not.

    rss_kib: the main process's peak RSS (`rusage.maxrss`, KiB on Linux): prefork children are not in it.
    processed: tasks it has run since it started. prefetch_count: its current QoS prefetch count.
    eta_task_limit / visibility_timeout: from its configuration (None: Celery's defaults, no limit and 3600 s).
    """

    rss_kib: int | None = None
    processed: int | None = None
    prefetch_count: int | None = None
    eta_task_limit: int | None = None
    visibility_timeout: float | None = None


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


Shares = Mapping[str, Mapping[str, str]]  # worker -> task -> its share of the task's pool rate


@dataclass(frozen=True)
class Plan:
    commands: tuple[Command, ...]
    unknown: tuple[Outcome, ...]  # limits for tasks a worker does not register: not sent, reported
    defaults: Defaults  # the learned defaults to hand to the next pass
    shares: Shares = field(default_factory=dict)  # the pool rates as split over this pass's workers


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
    pool_rates = {
        task: value
        for task, value in desired.pool_rate_limits.items()
        if _task_ok(problems, task, "pool rate limit")
        and _check(problems, *_rate_problem(task, value))
        and _check(problems, task not in rates, f"pool rate limit for {task}: the task has a per-worker rate too")
    }
    if desired.queues and not queues:
        problems.append("no valid queue: consumer routing left as it is")
    valid = PoolSettings(frozenset(queues), rates, times, pool_rates, desired.most_workers, desired.expected_workers)
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
    """Trailing `key=value` worker arguments that start workers with the pool's time limits enforced
    and with the start share of each pool rate (`PoolSettings.start_shares`).

    For the workload builders: `celery worker ... task_annotations=(json){...}`. It replaces any
    `task_annotations` of the app's own config, and a change of it changes the pod template, which
    restarts the workers, the only way Celery enforces a new time limit.
    """
    valid = validate(desired)[0]
    annotations: dict[str, dict[str, float | str]] = defaultdict(dict)
    for task, t in valid.time_limits.items():
        for key, value in (("soft_time_limit", t.soft), ("time_limit", t.hard)):
            if value is not None:
                annotations[task][key] = value
    for task, share in valid.start_shares.items():
        annotations[task]["rate_limit"] = share
    return {"task_annotations": "(json)" + json.dumps(annotations, sort_keys=True)} if annotations else {}


# --- planning ---------------------------------------------------------------------------------


def split_rate(rate: str, count: int) -> list[str]:
    """`count` shares of `rate` (N/s|m|h), larger first, that add up to it.

    Whole shares in the rate's unit or a longer one when that gives every worker at least 1;
    otherwise equal fractional shares per hour. Never 0: Celery reads 0 as "no limit".
    """
    tasks_per_second = per_second(rate)
    unit = rate.rpartition("/")[2]
    for longer in list(RATE_UNITS)[list(RATE_UNITS).index(unit) :]:
        total = tasks_per_second * RATE_UNITS[longer]
        whole = round(total)
        if abs(total - whole) < 1e-6 and whole >= count:
            base, extra = divmod(whole, count)
            return [f"{base + 1}/{longer}"] * extra + [f"{base}/{longer}"] * (count - extra)
    share = max(tasks_per_second * RATE_UNITS["h"] / count, MIN_SHARE_PER_HOUR)
    return [f"{share:.6f}".rstrip("0") + "/h"] * count


def share_rates(pool_rates: Mapping[str, str], workers: Iterable[str], ways: int = 0) -> dict[str, dict[str, str]]:
    """Each worker's share of every pool rate, split over the workers or `ways`, whichever is more:
    the first workers by name take the remainder."""
    members = sorted(workers)
    shares: dict[str, dict[str, str]] = {worker: {} for worker in members}
    if not members:
        return shares
    for task, rate in pool_rates.items():
        for worker, share in zip(members, split_rate(rate, max(len(members), ways)), strict=False):
            shares[worker][task] = share
    return shares


def describe_shares(pool_rates: Mapping[str, str], shares: Shares) -> str:
    """Which share of each pool rate is in force, for LimitsApplied: "a.b 60/m = 9/m x 4 + 8/m x 3"."""
    parts = []
    for task, rate in sorted(pool_rates.items()):
        given = Counter(worker_shares[task] for worker_shares in shares.values() if task in worker_shares)
        split = " + ".join(f"{share} x {count}" for share, count in sorted(given.items(), key=_larger_first))
        parts.append(f"{task} {rate} = {split or 'no worker'}")
    return "pool rates: " + "; ".join(parts) if parts else ""


def _larger_first(item: tuple[str, int]) -> float:
    return -per_second(item[0])


@dataclass(frozen=True)
class _Kind:
    """One kind of per-task limit: where it lives in the settings, its "none", how values compare."""

    command: Literal["rate_limit", "time_limit"]
    values: Callable[[PoolSettings | WorkerSettings | Defaults], Mapping[str, LimitValue]]
    none: LimitValue
    same: Callable[[LimitValue, LimitValue], bool]
    shared: bool = False  # pool-wide values are split into per-worker shares


def _same_rate(a: LimitValue, b: LimitValue) -> bool:
    """Equal rates in any spelling ("60/m" == "1/s"); a rate of zero is no limit, like None."""
    return per_second(a if isinstance(a, str) else None) == per_second(b if isinstance(b, str) else None)


KINDS = (
    _Kind("rate_limit", lambda s: s.rate_limits, None, _same_rate, shared=True),
    _Kind("time_limit", lambda s: s.time_limits, NO_TIME_LIMITS, lambda a, b: a == b),
)


def plan_convergence(
    desired: PoolSettings,
    observed: Mapping[str, WorkerSettings],
    defaults: Defaults | None = None,
    live: Iterable[str] | None = None,
) -> Plan:
    """The commands that bring every observed worker to `desired` (already validated).

    Only differences are sent, each to exactly the workers that need it; identical changes are
    grouped into one broadcast. Queues are added before any is cancelled, so a worker never
    stands without one. Limits for a task a worker does not register are reported, not sent.
    Pool rates are split over `live` (the pool's workers, observed or not; default: the observed):
    a silent worker still runs at its share, so it keeps one. They are split at least
    `desired.expected_workers` ways: on a scale-up the running workers are lowered before the new
    ones answer.
    """
    defaults = defaults or Defaults()
    members = observed if live is None else live
    shares = share_rates(desired.pool_rate_limits, members, desired.expected_workers)
    wanted: dict[tuple[CommandName, str, LimitValue], list[str]] = defaultdict(list)
    unknown: list[Outcome] = []
    learned: dict[str, dict[str, LimitValue]] = {}
    for kind in KINDS:

        def want_of(worker: str, kind: _Kind = kind) -> Mapping[str, LimitValue]:
            return {**kind.values(desired), **(shares.get(worker, {}) if kind.shared else {})}

        limited = _limited_tasks(kind, desired)
        started = desired.start_shares if kind.shared else {}
        learned[kind.command] = known = _learn(kind, limited, want_of, kind.values(defaults), observed, started)
        for worker, settings in sorted(observed.items()):
            want = want_of(worker)
            targets = {**{t: v for t, v in known.items() if t not in want}, **want}
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
    return Plan(tuple(commands), tuple(unknown), next_defaults, shares)


def _learn(
    kind: _Kind,
    limited: Iterable[str],
    want_of: Callable[[str], Mapping[str, LimitValue]],
    known: Mapping[str, LimitValue],
    observed: Mapping[str, WorkerSettings],
    started: Mapping[str, LimitValue],
) -> dict[str, LimitValue]:
    """`known` defaults plus, for each newly limited task, what the workers run it with now.

    The most common value among workers that differ from what the spec wants of them is the
    default; when all already match (the operator restarted after applying it), the true default
    is gone: none. A worker still at the share it was `started` with tells nothing of the default.
    """
    learned = dict(known)
    for task in limited:
        carriers = {w: s for w, s in observed.items() if task in s.tasks}
        if task in learned or not carriers:
            continue
        values = [(kind.values(s).get(task, kind.none), want_of(w).get(task)) for w, s in carriers.items()]
        differing = Counter(
            value
            for value, target in values
            if not kind.same(value, target) and not (task in started and kind.same(value, started[task]))
        )
        learned[task] = differing.most_common(1)[0][0] if differing else kind.none
    return learned


def _limited_tasks(kind: _Kind, desired: PoolSettings) -> set[str]:
    """Every task the spec limits with this kind, per worker or (for rates) pool-wide."""
    return {*kind.values(desired), *(desired.pool_rate_limits if kind.shared else ())}


def _still_restoring(
    kind: _Kind, learned: Mapping[str, LimitValue], desired: PoolSettings, observed: Mapping[str, WorkerSettings]
) -> dict[str, LimitValue]:
    """Defaults still needed: tasks still limited, and removed ones some worker has not got back yet."""
    want = _limited_tasks(kind, desired)
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
    workers: Iterable[str],
    errors: Iterable[Outcome],
    unreachable: Iterable[str],
    restart_pending: Iterable[str] = (),
    shares_in_force: str = "",
) -> Condition:
    """`LimitsApplied`: False with the first kind of trouble as reason and every line as message.

    Reasons: InvalidLimits (spec entries not sent), WorkerErrors (a worker refused or lacks the
    task), WorkersUnreachable (no reply after retries), RestartPending (running workers were sent
    time limits, which Celery enforces from their next start); True: Applied, or NoWorkers when
    the pool has none running (new ones get the settings on the first pass that finds them).
    `shares_in_force` (from `describe_shares`) ends every message: which split of each pool rate
    the workers were told.
    """
    condition = _limits_condition(workers, errors, unreachable, restart_pending)
    if not shares_in_force:
        return condition
    return condition._replace(message=_joined([condition.message, shares_in_force]))


def _limits_condition(
    workers: Iterable[str], errors: Iterable[Outcome], unreachable: Iterable[str], restart_pending: Iterable[str]
) -> Condition:
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
