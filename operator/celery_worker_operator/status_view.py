"""`status`: a pool as the cluster tells it (its status, conditions and the operator's Events),
shown the way `local` shows a pool running on this machine.

Pure: every function here takes the pool object and its Events as the API server returns them (plain
dicts) and a clock reading, so what a person sees is tested on real status dicts without a cluster.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

EVENTS_SHOWN = 8
LIST_COLUMNS = ("NAMESPACE", "NAME", "QUEUES", "DEPTH", "WAIT", "REPLICAS", "DESIRED", "NOT TRUE", "LAST DECISION")


def queue_table(status: Mapping[str, Any], title: str) -> Table:
    """One row per queue: what waits, what workers hold, how old the oldest message is."""
    queues = Table("queue", "depth", "reserved", "oldest (s)", title=title)
    for queue in status.get("queues", []):
        queues.add_row(
            queue["name"], str(queue["depth"]), str(queue["reserved"]), str(queue.get("oldestAgeSeconds", "-"))
        )
    return queues


def pool_view(pool: Mapping[str, Any], events: Sequence[Mapping[str, Any]], now: datetime) -> Group:
    """One pool: queues, rates and replicas, conditions, and the operator's latest decisions."""
    status = pool.get("status") or {}
    meta = pool["metadata"]
    numbers = Table.grid(padding=(0, 2))
    arrival, service = _per_second(status.get("arrivalRate")), _seconds(status.get("serviceTimeSeconds"))
    numbers.add_row("arrival", arrival, "service", service)
    numbers.add_row("depth", _text(status.get("depth")), "wait", _seconds(status.get("waitSeconds")))
    numbers.add_row(
        "replicas",
        f"{_text(status.get('replicas'))} (desired {_text(status.get('desiredReplicas'))})",
        "ready / online",
        f"{_text(status.get('readyReplicas'))} / {_text(status.get('workersOnline'))}",
    )
    numbers.add_row("start-up", _seconds(status.get("workerStartupSeconds")))
    conditions = Table("condition", "status", "reason", "since", "message", title="conditions")
    for condition in status.get("conditions", []):
        since = age(condition.get("lastTransitionTime"), now)
        message = condition.get("message", "")
        conditions.add_row(condition["type"], condition["status"], condition["reason"], since, message)
    decisions = Table("age", "type", "reason", "message", title="last decisions")
    for event in latest(events, EVENTS_SHOWN):
        decisions.add_row(age(event_time(event), now), event.get("type", ""), event["reason"], event.get("message", ""))
    heading = Text(f"pool {meta['namespace']}/{meta['name']}", style="bold")  # a title would wrap at the table's width
    return Group(heading, queue_table(status, "queues"), numbers, conditions, decisions)


def pools_table(pools: Iterable[Mapping[str, Any]]) -> Table:
    """Many pools, one line each, as `kubectl get cwp -A` with the conditions that need a look."""
    table = Table(*LIST_COLUMNS, box=None, pad_edge=False)
    for pool in pools:
        status, meta = pool.get("status") or {}, pool["metadata"]
        unwell = [_needs_a_look(c) for c in status.get("conditions", []) if _needs_a_look(c)]
        decision = status.get("lastDecision") or {}
        table.add_row(
            meta["namespace"],
            meta["name"],
            ",".join(pool.get("spec", {}).get("queues", [])),
            _text(status.get("depth")),
            _seconds(status.get("waitSeconds")),
            _text(status.get("replicas")),
            _text(status.get("desiredReplicas")),
            ",".join(unwell) or "-",
            f"{decision['from']}->{decision['to']} {decision.get('kind') or ''}".strip() if decision else "-",
        )
    return table


def _needs_a_look(condition: Mapping[str, Any]) -> str:
    """The condition's type when it needs a look, else "": False for most, True for `Advice` (then
    with the kinds found, `Advice:PrefetchImbalance`) and `Paused`; `LimitsApplied` held by the mode
    (paused, recommend-only) is no news: the mode says it."""
    if condition["type"] == "Advice":
        return f"Advice:{condition['reason']}" if condition["status"] == "True" else ""
    if condition["type"] == "Paused":
        return "Paused" if condition["status"] == "True" else ""
    if condition["type"] == "LimitsApplied" and condition["reason"] in ("Paused", "Recommend"):
        return ""
    return condition["type"] if condition["status"] != "True" else ""


def document(pool: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What `-o json|yaml` prints for a pool: its status exactly as stored, and its Events, oldest first."""
    meta = pool["metadata"]
    return {
        "namespace": meta["namespace"],
        "name": meta["name"],
        "status": dict(pool.get("status") or {}),
        "events": [
            {
                "time": event_time(event),
                "type": event.get("type"),
                "reason": event["reason"],
                "message": event.get("message", ""),
                "count": event.get("count", 1),
            }
            for event in latest(events, len(events))
        ],
    }


def latest(events: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """The `count` newest Events, oldest first (the API server lists them in no promised order)."""
    return sorted(events, key=lambda event: event_time(event) or "")[-count:] if count else []


def event_time(event: Mapping[str, Any]) -> str | None:
    """When it last happened: core/v1 Events carry lastTimestamp, events.k8s.io ones eventTime."""
    found = event.get("lastTimestamp") or event.get("eventTime") or event.get("metadata", {}).get("creationTimestamp")
    return None if found is None else str(found)


def age(timestamp: str | None, now: datetime) -> str:
    """Time since, as kubectl rounds it: seconds below 2 minutes, minutes below 2 hours, and so on."""
    if not timestamp:
        return "-"
    seconds = max(int((now - datetime.fromisoformat(timestamp.replace("Z", "+00:00"))).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * 2:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}s"


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/s"


def _text(value: object) -> str:
    return "-" if value is None else str(value)
