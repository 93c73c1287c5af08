"""PURE: Celery's control replies, read into plan types. Formats are those of celery/worker/control.py.

- `active_queues` -> a list of `Queue.as_dict()` dicts, each with a `name`;
- `registered(*items)` -> strings `"task.name [rate_limit=6/m time_limit=2.0]"`, where an item is
  listed only when not None and its value is `str()` of the attribute (no spaces: rates and numbers);
- a control command -> `{"ok": text}` or `{"error": text}`;
- `stats` -> the worker's `stats()`: `rusage.maxrss`, `total` {task: count}, `prefetch_count`, ...;
- `conf` -> its changed settings (`with_defaults=False`), e.g. `broker_transport_options`.
"""

from __future__ import annotations

from typing import Any

from .plan import TimeLimits, WorkerSettings, WorkerStats

TASK_INFO = ("rate_limit", "time_limit", "soft_time_limit")  # what `registered` is asked to report


def worker_settings(active_queues: Any, registered: Any) -> WorkerSettings:
    """One worker's settings from its two inspect replies; ValueError if they are not Celery's shape."""
    try:
        queues = frozenset(str(queue["name"]) for queue in active_queues)
        tasks = [_task_info(str(item)) for item in registered]
    except (TypeError, KeyError) as error:
        raise ValueError(f"unexpected inspect reply: {error!r}") from error
    return WorkerSettings(
        queues=queues,
        tasks=frozenset(name for name, _ in tasks),
        rate_limits={name: info["rate_limit"] for name, info in tasks if "rate_limit" in info},
        time_limits={
            name: TimeLimits(_seconds(info.get("soft_time_limit")), _seconds(info.get("time_limit")))
            for name, info in tasks
            if "time_limit" in info or "soft_time_limit" in info
        },
    )


def _task_info(item: str) -> tuple[str, dict[str, str]]:
    name, _, fields = item.partition(" [")
    pairs = (field.partition("=") for field in fields.rstrip("]").split())
    return name, {key: value for key, _, value in pairs}


def _seconds(value: str | None) -> float | None:
    return None if value is None else float(value)


def reply_error(reply: Any) -> str | None:
    """The error text of a control command's reply, or None when the worker said ok."""
    if isinstance(reply, dict) and "ok" in reply:
        return None
    if isinstance(reply, dict) and "error" in reply:
        return str(reply["error"])
    return f"unexpected reply {reply!r}"


def worker_stats(stats: Any, conf: Any) -> WorkerStats:
    """One worker's health numbers from its `stats` and `conf` replies; what is not there stays None."""
    stats = stats if isinstance(stats, dict) else {}
    conf = conf if isinstance(conf, dict) else {}
    rusage = stats.get("rusage") if isinstance(stats.get("rusage"), dict) else {}
    totals = stats.get("total")
    options = conf.get("broker_transport_options")
    visibility = options.get("visibility_timeout") if isinstance(options, dict) else None
    return WorkerStats(
        rss_kib=_integer(rusage.get("maxrss")),
        processed=sum(_integer(n) or 0 for n in totals.values()) if isinstance(totals, dict) else None,
        prefetch_count=_integer(stats.get("prefetch_count")),
        eta_task_limit=_integer(conf.get("worker_eta_task_limit")),
        visibility_timeout=float(visibility) if isinstance(visibility, int | float) else None,
    )


def _integer(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
