"""The chart's alerts and dashboard in a real Prometheus (built from github.com/prometheus/prometheus).

`promtool check rules` on the rule groups the chart renders; `promtool test rules` pins when each alert
fires and when it does not; and a real Prometheus scrapes a real `local --metrics-port` run (real Redis,
real workers): "wait over target" fires during an overloaded burst and not in the calm phase before it,
and every query of the Grafana dashboard returns data.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from celery_worker_operator.instrument import instrument, uninstrument
from tests.deploy.chart import manifests, of_kind
from tests.integration.test_local_cli import local_command, pool_manifest
from tests.support.local_app import app, record
from tests.support.operator_process import free_port
from tests.support.prometheus import running_prometheus
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
RULE_VALUES = {"metrics": {"prometheusRule": {"enabled": True}}}
WAIT_ALERT = "CeleryWorkerPoolWaitOverTarget"
# Each alert on its series: (alert, series of the pool, healthy value, unhealthy value, the chart value of its `for`).
CONDITION = 'celery_worker_operator_pool_condition{{namespace="shop",pool="{pool}",type="{type}",status="false"}}'
PINNED = [
    ("CeleryWorkerPoolMetricsUnavailable", CONDITION, {"type": "MetricsAvailable", "status": "false"}),
    ("CeleryWorkerPoolLimitsNotApplied", CONDITION, {"type": "LimitsApplied", "status": "false"}),
    ("CeleryWorkerPoolBlocked", CONDITION, {"type": "Ready", "status": "false"}),
    ("CeleryWorkerPoolCrashLooping", CONDITION, {"type": "WorkersRunning", "status": "false"}),
]
BAD_FROM = 5  # minutes: the unhealthy pool's series turn bad here; the healthy pool's never do


def rule_groups(values: dict[str, Any]) -> list[dict[str, Any]]:
    (rule,) = of_kind(manifests(values), "PrometheusRule")
    return list(rule["spec"]["groups"])


def minutes(duration: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit] // 60


def alerts_of(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def summary(rule: dict[str, Any], pool: str) -> str:
    return str(rule["annotations"]["summary"]).replace("{{ $labels.namespace }}/{{ $labels.pool }}", f"shop/{pool}")


def series(name: str, good: float, bad: float, length: int) -> list[dict[str, str]]:
    """The same series for a healthy pool (always `good`) and a pool that turns `bad` at BAD_FROM."""
    return [
        {"series": name.format(pool="calm"), "values": f"{good:g}x{length}"},
        {"series": name.format(pool="busy"), "values": f"{good:g}x{BAD_FROM - 1} {bad:g}x{length}"},
    ]


def case(alert: str, rule: dict[str, Any], inputs: list[dict[str, str]], labels: dict[str, str]) -> dict[str, Any]:
    """Not firing one minute before its `for` has passed, firing (for the busy pool only) one minute after."""
    fires_at = BAD_FROM + minutes(rule["for"])
    expected = {
        "exp_labels": {"namespace": "shop", "pool": "busy", **rule["labels"], **labels},
        "exp_annotations": {**rule["annotations"], "summary": summary(rule, "busy")},
    }
    return {
        "interval": "1m",
        "input_series": inputs,
        "alert_rule_test": [
            {"eval_time": f"{BAD_FROM}m", "alertname": alert, "exp_alerts": []},
            {"eval_time": f"{fires_at - 1}m", "alertname": alert, "exp_alerts": []},
            {"eval_time": f"{fires_at + 1}m", "alertname": alert, "exp_alerts": [expected]},
        ],
    }


def rule_tests(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    alerts = alerts_of(groups)
    length = BAD_FROM + max(minutes(rule["for"]) for rule in alerts.values()) + 5
    wait = alerts[WAIT_ALERT]
    waiting = [
        *series('celery_worker_operator_pool_wait_seconds{{namespace="shop",pool="{pool}"}}', 5, 90, length),
        *series('celery_worker_operator_pool_target_wait_seconds{{namespace="shop",pool="{pool}"}}', 30, 30, length),
    ]
    wait_case = case(WAIT_ALERT, wait, waiting, {})
    wait_case["alert_rule_test"][-1]["exp_alerts"][0]["exp_annotations"]["description"] = (
        "The oldest waiting task is 1m 30s old."
    )
    at_max = alerts["CeleryWorkerPoolAtMaxReplicas"]
    replicas = [
        *series('celery_worker_operator_pool_desired_replicas{{namespace="shop",pool="{pool}"}}', 3, 8, length),
        *series('celery_worker_operator_pool_max_replicas{{namespace="shop",pool="{pool}"}}', 8, 8, length),
    ]
    tests = [wait_case, case("CeleryWorkerPoolAtMaxReplicas", at_max, replicas, {})]
    for alert, name, labels in PINNED:
        tests.append(case(alert, alerts[alert], series(name.replace("{type}", labels["type"]), 0, 1, length), labels))
    return tests


def run_promtool(promtool: Path, *args: str, cwd: Path) -> str:
    result = subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, (
        f"promtool {' '.join(args)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def test_promtool_checks_the_charts_rules(promtool: Path, tmp_path: Path) -> None:
    groups = rule_groups(RULE_VALUES)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    out = run_promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert f"SUCCESS: {len(alerts_of(groups))} rules found" in out, out


def test_promtool_pins_when_each_alert_fires(promtool: Path, tmp_path: Path) -> None:
    groups = rule_groups(RULE_VALUES)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = rule_tests(groups)
    assert {t["alert_rule_test"][0]["alertname"] for t in tests} == set(alerts_of(groups)), "an alert is not pinned"
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(unit))
    run_promtool(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)

    broken = json.loads(json.dumps(unit))  # the pins can fail: claim the wait alert fires a minute too early
    broken["tests"][0]["alert_rule_test"][1]["exp_alerts"] = broken["tests"][0]["alert_rule_test"][2]["exp_alerts"]
    (tmp_path / "broken_test.yaml").write_text(yaml.safe_dump(broken))
    result = subprocess.run([str(promtool), "test", "rules", "broken_test.yaml"], cwd=tmp_path, capture_output=True)
    assert result.returncode != 0


# -- a real Prometheus on a real local run ----------------------------------------------------------

TARGET_WAIT, WAIT_FOR = 3, "4s"  # the pool's targetWaitSeconds; the chart's waitOverTargetFor, scaled down


@pytest.fixture
def stamped() -> Iterator[None]:
    """Tasks sent from here carry their publish time, so the probe knows how long the oldest has waited."""
    instrument(app)
    yield
    uninstrument()


@pytest.fixture
def local_run(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    """`local --metrics-port` on a pool of at most one single-slot worker: a burst overloads it for sure."""
    name = f"prom-{uuid.uuid4().hex[:8]}"
    autoscaling = {"minReplicas": 0, "maxReplicas": 1, "targetWaitSeconds": TARGET_WAIT}
    manifest = pool_manifest(redis_url, name, autoscaling, "tests.support.local_app:app")
    manifest["spec"]["worker"]["concurrency"] = 1
    port = free_port()
    options = ("--metrics-port", str(port), "--worker-log", str(tmp_path / "workers.log"))
    try:
        with local_command(manifest, tmp_path, *options) as (process, _):
            yield name, port, process
    finally:
        redis.Redis.from_url(redis_url).delete(name, f"{name}:started", f"{name}:ended")


def dashboard_queries(pool: str) -> list[tuple[str, str]]:
    """(panel title, query) for every query of the chart's dashboard, with its variables filled in."""
    (config_map,) = [o for o in manifests({}) if o["kind"] == "ConfigMap"]
    dashboard = json.loads(config_map["data"]["celery-worker-operator.json"])
    fill = {"$namespace": "default", "$pool": pool, "$__rate_interval": "30s"}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in fill.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def firing(prometheus: Any, pool: str, start: float, end: float) -> list[dict[str, Any]]:
    expr = f'ALERTS{{alertname="{WAIT_ALERT}", alertstate="firing", pool="{pool}"}}'
    return list(prometheus.query_range(expr, start, end))


def test_a_real_prometheus_fires_wait_over_target_in_a_burst_only_and_the_dashboard_has_data(
    prometheus_bin: Path,
    local_run: tuple[str, int, subprocess.Popen[bytes]],
    stamped: None,
    redis_url: str,
    tmp_path: Path,
) -> None:
    pool, port, process = local_run
    app.conf.broker_url = redis_url
    groups = rule_groups({"metrics": {"prometheusRule": {"enabled": True, "waitOverTargetFor": WAIT_FOR}}})
    with running_prometheus(prometheus_bin, tmp_path / "prometheus", port, groups) as prometheus:
        wait_for(prometheus.target_health, lambda health: health == ["up"], timeout=60, interval=0.5)
        record.apply_async((pool, 0, 0.2), queue=pool)  # from zero to one worker: a scale decision
        wait_for(lambda: prometheus.query(f'celery_worker_up{{pool="{pool}"}} == 1'), bool, timeout=90, interval=0.5)
        wait_for(lambda: redis.Redis.from_url(redis_url).llen(f"{pool}:ended"), bool, timeout=60, interval=0.5)

        calm_start = time.time()
        for number in range(1, 9):  # one 0.2 s task every 1.5 s: the single slot keeps up
            record.apply_async((pool, number, 0.2), queue=pool)
            time.sleep(1.5)
        calm_end = time.time()

        burst_start = time.time()
        for number in range(9, 31):  # 22 tasks of 1 s on one slot: the last waits ~20 s, the target is 3 s
            record.apply_async((pool, number, 1.0), queue=pool)
        wait_for(lambda: firing(prometheus, pool, burst_start, time.time()), bool, timeout=60, interval=1)
        assert process.poll() is None, "local mode exited"
        assert firing(prometheus, pool, calm_start, calm_end) == [], "the alert fired while the pool kept up"
        waits = prometheus.query_range(
            f'celery_worker_operator_pool_wait_seconds{{pool="{pool}"}}', calm_start, calm_end
        )
        assert all(float(v) < TARGET_WAIT for found in waits for _, v in found["values"]), waits

        ended = redis.Redis.from_url(redis_url)
        wait_for(lambda: ended.llen(f"{pool}:ended"), lambda done: done == 31, timeout=90, interval=1)
        time.sleep(3)  # a few more scrapes after the last task, so every rate() window holds its counts
        empty = [(title, expr) for title, expr in dashboard_queries(pool) if not prometheus.query(expr)]
        assert empty == [], f"dashboard queries with no data: {empty}"
        succeeded = prometheus.query(f'sum(celery_task_succeeded_total{{pool="{pool}"}})')
        assert float(succeeded[0]["value"][1]) == 31, "Prometheus holds what the tasks' own ledger says"
