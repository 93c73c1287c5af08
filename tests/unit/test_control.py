"""The pure half of control: planning, validation, Celery reply parsing and the condition, by tables."""

from __future__ import annotations

import pytest

from celery_worker_operator.control import (
    Command,
    Defaults,
    Outcome,
    PoolSettings,
    TimeLimits,
    WorkerSettings,
    describe_shares,
    limits_condition,
    plan_convergence,
    split_rate,
    validate,
    worker_start_settings,
)
from celery_worker_operator.control.wire import reply_error, worker_settings
from celery_worker_operator.spec import CeleryWorkerPoolSpec
from celery_worker_operator.units import per_second
from tests.unit.test_layers import ADAPTERS, IO_MODULES, PACKAGE, imported

TASK, OTHER = "app.send", "app.other"
TASKS = frozenset({TASK, OTHER})


def worker(queues: set[str], rates: dict[str, str] | None = None, **times: TimeLimits) -> WorkerSettings:
    return WorkerSettings(frozenset(queues), TASKS, rates or {}, {t.replace("_", "."): v for t, v in times.items()})


def pool(queues: set[str], rates: dict[str, str] | None = None, **times: TimeLimits) -> PoolSettings:
    return PoolSettings(frozenset(queues), rates or {}, {t.replace("_", "."): v for t, v in times.items()})


def sent(commands: tuple[Command, ...]) -> list[str]:
    return [f"{c} -> {','.join(c.destination)}" for c in commands]


@pytest.mark.parametrize(
    ("desired", "observed", "expected"),
    [
        pytest.param(pool({"q"}), {"p@a": worker({"q"})}, [], id="already-converged"),
        pytest.param(
            pool({"q", "r"}),
            {"p@a": worker({"q", "old"}), "p@b": worker({"q", "r"})},
            ["add_consumer r -> p@a", "cancel_consumer old -> p@a"],
            id="queues-add-before-cancel-only-where-needed",
        ),
        pytest.param(
            pool({"q"}, {TASK: "6/m"}),
            {"p@a": worker({"q"}), "p@b": worker({"q"}), "p@c": worker({"q"}, {TASK: "6/m"})},
            ["rate_limit app.send 6/m -> p@a,p@b"],
            id="one-broadcast-to-the-workers-that-differ",
        ),
        pytest.param(
            pool({"q"}, {TASK: "60/m"}), {"p@a": worker({"q"}, {TASK: "1/s"})}, [], id="same-rate-other-spelling"
        ),
        pytest.param(
            pool({"q"}, app_send=TimeLimits(None, 2)),
            {"p@a": worker({"q"}, app_send=TimeLimits(1, 2)), "p@b": worker({"q"})},
            ["time_limit app.send soft=none hard=2 -> p@a,p@b"],
            id="time-limits-both-values-each-time",
        ),
        pytest.param(pool(set()), {"p@a": worker({"x", "y"})}, [], id="no-queues-means-routing-untouched"),
    ],
)
def test_plan_sends_only_the_difference(
    desired: PoolSettings, observed: dict[str, WorkerSettings], expected: list[str]
) -> None:
    assert sent(plan_convergence(desired, observed).commands) == expected


def test_a_new_worker_gets_everything_and_the_converged_one_nothing() -> None:
    desired = pool({"q"}, {TASK: "6/m"}, app_other=TimeLimits(1, 2))
    converged = worker({"q"}, {TASK: "6/m"}, app_other=TimeLimits(1, 2))
    plan = plan_convergence(desired, {"p@old": converged, "p@new": worker({"celery"})})
    assert sent(plan.commands) == [
        "add_consumer q -> p@new",
        "rate_limit app.send 6/m -> p@new",
        "time_limit app.other soft=1 hard=2 -> p@new",
        "cancel_consumer celery -> p@new",
    ]


def test_a_removed_limit_restores_the_default_seen_before_the_first_change() -> None:
    declared = worker({"q"}, {TASK: "100/m"})  # as the code declares it
    first = plan_convergence(pool({"q"}, {TASK: "6/m"}), {"p@a": declared})
    assert sent(first.commands) == ["rate_limit app.send 6/m -> p@a"]
    assert first.defaults.rate_limits == {TASK: "100/m"}
    # A worker that started since then comes up with the declared default too.
    limited = {"p@a": worker({"q"}, {TASK: "6/m"}), "p@b": declared}
    removed = plan_convergence(pool({"q"}), limited, first.defaults)
    assert sent(removed.commands) == ["rate_limit app.send 100/m -> p@a"]
    assert removed.defaults.rate_limits == {TASK: "100/m"}, "kept until every worker has it back"
    done = plan_convergence(pool({"q"}), {"p@a": declared, "p@b": declared}, removed.defaults)
    assert (done.commands, done.defaults.rate_limits) == ((), {})


@pytest.mark.parametrize(
    ("observed", "restored"),
    [
        pytest.param({"p@a": worker({"q"})}, "rate_limit app.send none -> p@a", id="no-default-means-no-limit"),
        pytest.param(
            {"p@a": worker({"q"}, {TASK: "6/m"})}, "rate_limit app.send none -> p@a", id="default-unseen-resets-to-none"
        ),
    ],
)
def test_reset_without_a_known_default_removes_the_limit(observed: dict[str, WorkerSettings], restored: str) -> None:
    learned = plan_convergence(pool({"q"}, {TASK: "6/m"}), observed).defaults
    after = {w: worker({"q"}, {TASK: "6/m"}) for w in observed}
    assert sent(plan_convergence(pool({"q"}), after, learned).commands) == [restored]


def test_a_time_limit_reset_sends_none_for_both() -> None:
    learned = plan_convergence(pool({"q"}, app_send=TimeLimits(hard=5)), {"p@a": worker({"q"})}).defaults
    plan = plan_convergence(pool({"q"}), {"p@a": worker({"q"}, app_send=TimeLimits(hard=5))}, learned)
    assert [c.arguments for c in plan.commands] == [{"task_name": TASK, "soft": None, "hard": None}]


def test_defaults_survive_a_pass_without_workers() -> None:
    learned = Defaults(rate_limits={TASK: "100/m"})
    assert plan_convergence(pool({"q"}), {}, learned).defaults == learned


def test_unknown_tasks_are_reported_per_worker_and_not_sent_while_the_rest_is() -> None:
    plan = plan_convergence(pool({"q"}, {"app.nope": "1/s", TASK: "6/m"}), {"p@a": worker({"q"})})
    assert sent(plan.commands) == ["rate_limit app.send 6/m -> p@a"]
    assert plan.unknown == (Outcome("p@a", "rate_limit app.nope: unknown task (not registered)"),)


@pytest.mark.parametrize(
    ("desired", "problem"),
    [
        (pool({"q"}, {TASK: "6/x"}), "rate limit '6/x' for app.send: not N/s, N/m or N/h"),
        (pool({"q"}, {TASK: "0/m"}), "rate limit '0/m' for app.send: zero means unlimited to Celery; remove it"),
        (pool({"q"}, {"bad name": "1/s"}), "rate limit for 'bad name': not a task name"),
        (pool({"q"}, app_send=TimeLimits(5, 2)), "time limit soft=5 hard=2 for app.send: set soft, hard or both"),
        (pool({"q"}, app_send=TimeLimits()), "time limit soft=none hard=none for app.send: set soft, hard or both"),
        (pool({"q", "no spaces"}), "queue 'no spaces': not a queue name"),
    ],
)
def test_invalid_entries_are_dropped_and_reported_the_rest_kept(desired: PoolSettings, problem: str) -> None:
    valid, problems = validate(desired)
    assert len(problems) == 1 and problems[0].worker is None and problems[0].message.startswith(problem)
    assert valid.queues == {"q"} and not valid.rate_limits and not valid.time_limits


def test_no_valid_queue_leaves_routing_alone() -> None:
    valid, problems = validate(pool({"a b"}, {TASK: "1/s"}))
    assert (valid.queues, dict(valid.rate_limits)) == (frozenset(), {TASK: "1/s"})
    assert [p.message for p in problems][-1] == "no valid queue: consumer routing left as it is"


def test_settings_from_a_spec() -> None:
    spec = CeleryWorkerPoolSpec.model_validate(
        {
            "broker": {"url": "redis://redis:6379/0"},
            "queues": ["a", "b"],
            "scaleTargetRef": {"name": "workers"},
            "autoscaling": {"maxReplicas": 6},
            "limits": {
                "rateLimits": {TASK: "6/m"},
                "timeLimits": {OTHER: {"hard": 30}},
                "poolRateLimits": {"app.third": "60/m"},
            },
        }
    )
    assert PoolSettings.from_spec(spec) == PoolSettings(
        frozenset({"a", "b"}), {TASK: "6/m"}, {OTHER: TimeLimits(None, 30)}, {"app.third": "60/m"}, most_workers=6
    )


@pytest.mark.parametrize(("rate", "per_sec"), [("6/m", 0.1), ("2/s", 2), ("3600/h", 1), ("10", 10), (None, 0)])
def test_rates_read_as_celery_reads_them(rate: str | None, per_sec: float) -> None:
    assert per_second(rate) == pytest.approx(per_sec)


def test_worker_settings_from_celery_replies() -> None:
    registered = ["app.send [rate_limit=6/m time_limit=2.0]", "app.other [soft_time_limit=1 time_limit=3]", "app.x"]
    settings = worker_settings([{"name": "q", "exchange": {}}], registered)
    assert settings == WorkerSettings(
        frozenset({"q"}),
        frozenset({"app.send", "app.other", "app.x"}),
        {"app.send": "6/m"},
        {"app.send": TimeLimits(None, 2.0), "app.other": TimeLimits(1.0, 3.0)},
    )


@pytest.mark.parametrize(("queues", "registered"), [([{"no": "name"}], []), (None, []), ([], ["t [time_limit=x]"])])
def test_unexpected_replies_are_errors(queues: object, registered: object) -> None:
    with pytest.raises(ValueError):
        worker_settings(queues, registered)


@pytest.mark.parametrize(
    ("reply", "error"),
    [({"ok": "done"}, None), ({"error": "unknown task"}, "unknown task"), ("pong", "unexpected reply 'pong'")],
)
def test_reply_errors(reply: object, error: str | None) -> None:
    assert reply_error(reply) == error


@pytest.mark.parametrize(
    ("workers", "errors", "unreachable", "expected"),
    [
        (["p@a"], [], [], ("True", "Applied")),
        ([], [], [], ("True", "NoWorkers")),
        (["p@a"], [], ["p@a"], ("False", "WorkersUnreachable")),
        (["p@a"], [], [], ("False", "RestartPending")),
        (["p@a"], [Outcome("p@a", "rate_limit x 1/s: unknown task")], ["p@b"], ("False", "WorkerErrors")),
        (
            ["p@a"],
            [Outcome("p@a", "boom"), Outcome(None, "queue 'a b': not a queue name")],
            [],
            ("False", "InvalidLimits"),
        ),
    ],
)
def test_condition(
    workers: list[str], errors: list[Outcome], unreachable: list[str], expected: tuple[str, str]
) -> None:
    pending = workers if expected[1] == "RestartPending" else []
    condition = limits_condition(workers, errors, unreachable, pending)
    assert (condition.status, condition.reason) == expected
    for worker, message in errors:
        assert f"{worker or 'spec'}: {message}" in condition.message
    for silent in unreachable:
        assert f"{silent}: no reply" in condition.message


def test_condition_message_is_bounded() -> None:
    condition = limits_condition(["p@a"], [Outcome("p@a", "x" * 100)] * 100, [])
    assert len(condition.message) <= 4000 and condition.message.endswith("(100 lines)")


def test_workers_start_with_the_valid_time_limits_as_annotations() -> None:
    desired = pool({"q"}, {TASK: "6/m"}, app_send=TimeLimits(None, 30), app_other=TimeLimits(10, 20))
    assert worker_start_settings(desired) == {
        "task_annotations": '(json){"app.other": {"soft_time_limit": 10, "time_limit": 20}, '
        '"app.send": {"time_limit": 30}}'
    }
    assert worker_start_settings(pool({"q"}, {TASK: "6/m"}, app_x=TimeLimits(5, 1))) == {}


@pytest.mark.parametrize("module", ["plan.py", "wire.py"])
def test_the_planner_and_reply_reader_are_pure(module: str) -> None:
    names = imported(PACKAGE / "control" / module)
    assert not names & IO_MODULES, f"{module} imports I/O: {names & IO_MODULES}"
    assert not {n.lstrip(".") for n in names if n.startswith(".")} & (ADAPTERS - {"control"})


# --- pool rate limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "count", "shares"),
    [
        pytest.param("60/m", 1, ["60/m"], id="one-worker-has-it-all"),
        pytest.param("60/m", 3, ["20/m"] * 3, id="even-split"),
        pytest.param("60/m", 7, ["9/m"] * 4 + ["8/m"] * 3, id="remainder-spread-over-the-first"),
        pytest.param("5/m", 6, ["50/h"] * 6, id="fewer-than-workers-goes-to-a-longer-unit"),
        pytest.param("2/s", 3, ["40/m"] * 3, id="seconds-to-minutes"),
        pytest.param("1.5/s", 2, ["45/m"] * 2, id="fractional-rate-in-whole-minutes"),
        pytest.param("5/h", 6, ["0.833333/h"] * 6, id="fractional-shares-never-zero"),
    ],
)
def test_split_rate_adds_up_and_never_says_unlimited(rate: str, count: int, shares: list[str]) -> None:
    split = split_rate(rate, count)
    assert split == shares
    assert all(per_second(share) > 0 for share in split)
    assert sum(per_second(share) for share in split) == pytest.approx(per_second(rate), rel=1e-5)


def test_pool_rates_are_shared_by_the_live_workers_and_resent_when_they_change() -> None:
    desired = PoolSettings(frozenset({"q"}), pool_rate_limits={TASK: "60/m"})
    one = plan_convergence(desired, {"p@a": worker({"q"})})
    assert sent(one.commands) == ["rate_limit app.send 60/m -> p@a"]
    three = {w: worker({"q"}, {TASK: "60/m"}) for w in ("p@a",)} | {"p@b": worker({"q"}), "p@c": worker({"q"})}
    assert sent(plan_convergence(desired, three, one.defaults).commands) == ["rate_limit app.send 20/m -> p@a,p@b,p@c"]
    # p@c stays silent this pass: it still runs at its share, so the others do not take it.
    silent = plan_convergence(desired, {"p@a": worker({"q"}, {TASK: "20/m"})}, live=["p@a", "p@b", "p@c"])
    assert silent.commands == ()
    # One of three crashed: the two left share the whole rate.
    two = plan_convergence(desired, {w: worker({"q"}, {TASK: "20/m"}) for w in ("p@a", "p@b")})
    assert sent(two.commands) == ["rate_limit app.send 30/m -> p@a,p@b"]


def test_the_shares_in_force_are_named_in_the_condition() -> None:
    desired = PoolSettings(frozenset({"q"}), pool_rate_limits={TASK: "60/m"})
    workers = [f"p@{n}" for n in "abcdefg"]
    plan = plan_convergence(desired, {w: worker({"q"}) for w in workers})
    said = describe_shares(desired.pool_rate_limits, plan.shares)
    assert said == "pool rates: app.send 60/m = 9/m x 4 + 8/m x 3"
    condition = limits_condition(workers, [], [], shares_in_force=said)
    assert condition.reason == "Applied" and condition.message.endswith(said)


def test_removing_a_pool_rate_restores_the_default_each_worker_had() -> None:
    declared = worker({"q"}, {TASK: "100/m"})
    first = plan_convergence(PoolSettings(frozenset({"q"}), pool_rate_limits={TASK: "60/m"}), {"p@a": declared})
    assert first.defaults.rate_limits == {TASK: "100/m"}
    removed = plan_convergence(pool({"q"}), {"p@a": worker({"q"}, {TASK: "60/m"})}, first.defaults)
    assert sent(removed.commands) == ["rate_limit app.send 100/m -> p@a"]


def test_a_task_with_both_a_worker_and_a_pool_rate_keeps_the_worker_rate_and_says_so() -> None:
    valid, problems = validate(PoolSettings(frozenset({"q"}), {TASK: "6/m"}, pool_rate_limits={TASK: "60/m"}))
    assert valid.rate_limits == {TASK: "6/m"} and valid.pool_rate_limits == {}
    assert [p.message for p in problems] == [f"pool rate limit for {TASK}: the task has a per-worker rate too"]


def test_new_workers_start_with_the_share_at_the_largest_size_and_that_is_not_taken_for_a_default() -> None:
    desired = PoolSettings(frozenset({"q"}), pool_rate_limits={TASK: "60/m"}, most_workers=7)
    assert worker_start_settings(desired) == {"task_annotations": '(json){"app.send": {"rate_limit": "8/m"}}'}
    fresh = {"p@a": worker({"q"}, {TASK: "8/m"}), "p@b": worker({"q"}, {TASK: "8/m"})}
    plan = plan_convergence(desired, fresh)
    assert sent(plan.commands) == ["rate_limit app.send 30/m -> p@a,p@b"]
    assert plan.defaults.rate_limits == {TASK: None}, "removing the pool rate must not leave 8/m behind"


def test_pool_rates_split_over_the_replicas_the_pool_is_set_to_when_more_than_answer() -> None:
    growing = PoolSettings(frozenset({"q"}), pool_rate_limits={TASK: "60/m"}, expected_workers=6)
    running = {w: worker({"q"}, {TASK: "20/m"}) for w in ("p@a", "p@b", "p@c")}
    plan = plan_convergence(growing, running)
    assert sent(plan.commands) == ["rate_limit app.send 10/m -> p@a,p@b,p@c"], "lowered before the new ones start"
    assert describe_shares(growing.pool_rate_limits, plan.shares) == "pool rates: app.send 60/m = 10/m x 3"
