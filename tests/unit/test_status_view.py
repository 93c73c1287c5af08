"""`status` rendering on real status dicts: a pool and its Events as the live control plane returned
them (tests/unit/data/live_pool.json, captured from tests/operator/test_status.py's pool), and a blocked
pool's status as the reconciler builds it."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console, RenderableType

from celery_worker_operator.reconciler import PoolMemory, build_status, set_condition
from celery_worker_operator.spec import CeleryWorkerPoolStatus
from celery_worker_operator.status_view import EVENTS_SHOWN, age, document, latest, pool_view, pools_table

LIVE = json.loads((Path(__file__).parent / "data" / "live_pool.json").read_text())
SCALED_UP_AT = datetime(2026, 12, 3, 10, 20, 23, tzinfo=UTC)  # the ScaledUp Event's lastTimestamp


def text(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(renderable)
    return out.getvalue()


def blocked_pool() -> dict[str, Any]:
    """A pool whose Secret is missing: conditions only, no measurements (the reconciler's own output)."""
    memory, now = PoolMemory(), SCALED_UP_AT.timestamp()
    set_condition(memory, "Ready", "False", "SecretMissing", "Secret orders-broker not found", now, 2)
    status = build_status(None, None, memory, 2)
    return {"metadata": {"namespace": "shop", "name": "orders"}, "spec": {"queues": ["orders"]}, "status": status}


def test_one_pool_shows_queues_numbers_conditions_and_decisions_oldest_first() -> None:
    pool, events = LIVE["pool"], LIVE["events"]
    shown = text(pool_view(pool, events, SCALED_UP_AT + timedelta(seconds=45)))
    meta, status = pool["metadata"], pool["status"]
    assert f"pool {meta['namespace']}/{meta['name']}" in shown
    assert status["queues"][0]["name"] in shown
    assert "3 (desired 3)" in shown and "3 / 3" in shown and "0.52/s" in shown
    for condition in status["conditions"]:
        assert condition["type"] in shown and condition["message"] in shown
    assert shown.index("WorkloadMissing") < shown.index("ScaledUp"), "decisions are listed oldest first"
    assert "│ 45s │ Normal  │ ScaledUp" in shown
    assert status["lastDecision"]["reason"] in shown


def test_a_blocked_pool_shows_dashes_where_nothing_was_measured() -> None:
    shown = text(pool_view(blocked_pool(), [], SCALED_UP_AT + timedelta(minutes=5)))
    assert "SecretMissing" in shown and "Secret orders-broker not found" in shown and "5m" in shown
    assert "- (desired -)" in shown and "arrival   -" in shown


def test_the_list_names_conditions_that_are_not_true_and_the_last_decision() -> None:
    lines = text(pools_table([LIVE["pool"], blocked_pool()])).splitlines()
    header, live, blocked = (line.split() for line in lines[:3])
    assert header[:3] == ["NAMESPACE", "NAME", "QUEUES"]
    meta, queue = LIVE["pool"]["metadata"], LIVE["pool"]["spec"]["queues"][0]
    assert live == [meta["namespace"], meta["name"], queue, "0", "0s", "3", "3", "-", "1->3", "Backlog"]
    assert blocked == ["shop", "orders", "orders", "-", "-", "-", "-", "Ready", "-"]


def test_the_document_carries_the_status_as_stored_and_round_trips() -> None:
    doc = document(LIVE["pool"], LIVE["events"])
    status = LIVE["pool"]["status"]
    assert json.loads(json.dumps(doc)) == doc and yaml.safe_load(yaml.safe_dump(doc)) == doc
    assert doc["status"] == status
    model = CeleryWorkerPoolStatus.model_validate(doc["status"])
    assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == status
    assert [e["reason"] for e in doc["events"]] == ["WorkloadMissing", "ScaledUp"]
    assert doc["events"][1] == {
        "time": "2026-12-03T10:20:23Z",
        "type": "Normal",
        "reason": "ScaledUp",
        "message": status["lastDecision"]["reason"],
        "count": 1,
    }


def test_latest_keeps_the_newest_events_and_reads_either_timestamp() -> None:
    events = [
        {"reason": f"R{i}", "lastTimestamp": f"2026-12-03T10:{i:02d}:00Z"} for i in reversed(range(EVENTS_SHOWN + 3))
    ]
    events.append({"reason": "New", "lastTimestamp": None, "eventTime": "2026-12-03T11:00:00.000000Z"})
    kept = latest(events, EVENTS_SHOWN)
    assert [e["reason"] for e in kept] == [f"R{i}" for i in range(4, EVENTS_SHOWN + 3)] + ["New"]
    assert latest(events, 0) == []


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (119, "119s"), (120, "2m"), (7199, "119m"), (7200, "2h"), (200000, "2d")]
)
def test_ages_round_as_kubectl_does(seconds: int, shown: str) -> None:
    assert age("2026-12-03T10:20:23Z", SCALED_UP_AT + timedelta(seconds=seconds)) == shown
    assert age(None, SCALED_UP_AT) == "-"


def test_the_list_names_advice_when_it_holds_and_not_when_nothing_is_found() -> None:
    memory, now = PoolMemory(), SCALED_UP_AT.timestamp()
    set_condition(memory, "Advice", "False", "NoFindings", "nothing applies", now, 2)
    quiet = {"metadata": {"namespace": "shop", "name": "orders"}, "status": build_status(None, None, memory, 2)}
    set_condition(memory, "Advice", "True", "PrefetchImbalance,EventsDisabled", "...", now, 2)
    advised = {"metadata": {"namespace": "shop", "name": "mails"}, "status": build_status(None, None, memory, 2)}
    _, quiet_line, advised_line = (line.split() for line in text(pools_table([quiet, advised])).splitlines()[:3])
    assert quiet_line[-2] == "-" and advised_line[-2] == "Advice:PrefetchImbalance,EventsDisabled"


def test_the_list_names_a_pause_and_not_the_limits_the_mode_holds_back() -> None:
    memory, now = PoolMemory(), SCALED_UP_AT.timestamp()
    set_condition(memory, "Paused", "False", "Recommend", "recommend only", now, 2)
    set_condition(memory, "LimitsApplied", "Unknown", "Recommend", "not broadcast", now, 2)
    recommending = {"metadata": {"namespace": "shop", "name": "orders"}, "status": build_status(None, None, memory, 2)}
    set_condition(memory, "Paused", "True", "PausedByAnnotation", "held", now, 2)
    set_condition(memory, "LimitsApplied", "Unknown", "Paused", "not broadcast", now, 2)
    paused = {"metadata": {"namespace": "shop", "name": "mails"}, "status": build_status(None, None, memory, 2)}
    _, recommending_line, paused_line = (
        line.split() for line in text(pools_table([recommending, paused])).splitlines()[:3]
    )
    assert recommending_line[-2] == "-" and paused_line[-2] == "Paused"
