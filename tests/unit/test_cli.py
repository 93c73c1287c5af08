"""The command line as a user meets it: output, exit codes and error messages."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from celery_worker_operator.cli import main
from celery_worker_operator.crd import build_crd

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_crd_prints_the_generated_definition() -> None:
    code, output = run("crd")
    assert code == 0
    assert yaml.safe_load(output) == build_crd()


def test_plan_shows_the_guides_example() -> None:
    code, output = run("plan", "--arrival", "10/m", "--duration", "10m", "--concurrency", "4", "--utilization", "1")
    assert code == 0
    assert "= 100 busy slots" in output
    assert "ceil(100 / 4) = 25" in output


def test_plan_counts_the_backlog() -> None:
    code, output = run(
        "plan", "--arrival", "0", "--duration", "3s", "--concurrency", "2", "--backlog", "100", "--target-wait", "30s"
    )
    assert code == 0
    assert "100 waiting x 3 s / 30 s = 10" in output
    assert "ceil(10 / 2) = 5" in output


def test_plan_shows_the_drain_horizon_and_the_wake_threshold() -> None:
    code, output = run(
        "plan", "--arrival", "0", "--duration", "1s", "--concurrency", "1", "--backlog", "30", "--target-wait", "10s",
        "--oldest", "4s", "--max-replicas", "20",
    )  # fmt: skip
    assert code == 0, output
    assert "10 s target - 4 s waited = 6 s" in output
    assert "30 waiting x 1 s / 6 s = 5" in output
    assert "more than 30 messages are ready (5 x 1 slots, 30 seen waiting)" in output


def test_plan_takes_the_start_up_off_the_drain_when_the_pool_grows() -> None:
    code, output = run(
        "plan", "--arrival", "0", "--duration", "1s", "--concurrency", "1", "--backlog", "30", "--target-wait", "10s",
        "--oldest", "2s", "--startup", "3s", "--max-replicas", "20",
    )  # fmt: skip
    assert code == 0, output
    assert "10 s target - 2 s waited - 3 s start-up (the pool grows) = 5 s" in output
    assert "30 waiting x 1 s / 5 s = 6" in output


def test_plan_rejects_a_bad_rate_with_usage_help() -> None:
    code, output = run("plan", "--arrival", "ten a minute", "--duration", "1s", "--concurrency", "1")
    assert code == 2
    assert "is not a rate such as 5/s" in output


def test_simulate_compares_policies_on_a_scenario() -> None:
    code, output = run("simulate", "--scenario", "herd", "--policy", "ours,keda,fixed:3")
    assert code == 0
    for row in ("ours", "keda", "fixed:3", "oracle"):
        assert row in output


def test_simulate_says_which_terms_drove_our_decisions() -> None:
    code, output = run("simulate", "--scenario", "burst", "--policy", "ours,keda-tuned")
    assert code == 0, output
    ours = next(line for line in output.splitlines() if line.startswith("ours:"))
    assert "early passes (a burst between polls)" in ours
    assert "steady term from the recent rate in" in ours
    assert "its oldest had waited" in ours and "idle workers removed past the step limit" in ours
    assert "less the new workers' start-up in" in ours
    assert not any(line.startswith("keda-tuned:") for line in output.splitlines())


def test_simulate_replays_a_trace_with_a_pools_spec(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,task,duration\n" + "".join(f"{i * 0.5},job,2\n" for i in range(200)))
    code, output = run("simulate", "--trace", str(trace), "--pool", str(ROOT / "examples/redis-managed-pool.yaml"))
    assert code == 0, output
    assert "200 tasks" in output


def test_simulate_needs_exactly_one_workload() -> None:
    code, output = run("simulate")
    assert code == 2
    assert "exactly one of --scenario or --trace" in output


def test_simulate_rejects_an_unknown_policy() -> None:
    code, output = run("simulate", "--scenario", "steady", "--policy", "hpa")
    assert code == 2
    assert "unknown policy 'hpa'" in output


def test_validate_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "pool.yaml"
    document = yaml.safe_load((ROOT / "examples/redis-managed-pool.yaml").read_text())
    document["spec"]["autoscaling"]["maxReplicas"] = 0
    bad.write_text(yaml.safe_dump(document))
    code, output = run("validate", str(bad))
    assert code == 2
    assert "spec.autoscaling.maxReplicas" in output
