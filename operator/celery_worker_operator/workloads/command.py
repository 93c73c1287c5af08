"""The `celery worker` command line for a pool, shared by Kubernetes pods and local processes. Pure."""

from __future__ import annotations

import json
import math
import re

from ..control.plan import PoolSettings, worker_start_settings
from ..naming import PoolIdentity
from ..spec import CeleryWorkerPoolSpec, WorkerSpec

GRACE_MARGIN_SECONDS = 15
MIN_GRACE_SECONDS = 30
CONCURRENCY_ARG = re.compile(r"^(?:-c|--concurrency)(?:=(\d+))?$")


def worker_args(pool: PoolIdentity, member: str, spec: CeleryWorkerPoolSpec, worker: WorkerSpec) -> list[str]:
    """Arguments after `celery`: `-A app worker ...`, hostname `<pool>.<namespace>@<member>` so that
    telemetry and control broadcasts find the worker, and only its own pool's (naming.py)."""
    args = ["-A", worker.app, "worker", "-Q", ",".join(spec.queues), "-c", str(worker.concurrency)]
    args += [
        "-P",
        worker.pool,
        "-n",
        pool.hostname(member),
        f"--prefetch-multiplier={worker.prefetch_multiplier}",
    ]
    if worker.disable_prefetch:
        args.append("--disable-prefetch")
    if worker.max_tasks_per_child is not None:
        args.append(f"--max-tasks-per-child={worker.max_tasks_per_child}")
    if worker.max_memory_per_child is not None:
        args.append(f"--max-memory-per-child={worker.max_memory_per_child}")
    if worker.events:
        args.append("-E")
    args += list(worker.extra_args)
    # Settings without a flag go last, as `key=value` (Celery reads them as configuration).
    args.append(f"task_acks_late={'true' if worker.acks_late else 'false'}")
    if worker.soft_shutdown_seconds:
        args.append(f"worker_soft_shutdown_timeout={worker.soft_shutdown_seconds:g}")
    if spec.broker.transport_options is not None:  # the probe reads the broker with the same options
        options = json.dumps(spec.broker.transport_options.as_celery(), separators=(",", ":"))
        args.append(f"broker_transport_options=(json){options}")
    # Celery enforces time limits only as a worker starts with them: a change rolls the pods.
    args += [f"{key}={value}" for key, value in worker_start_settings(PoolSettings.from_spec(spec)).items()]
    return args


def grace_seconds(spec: CeleryWorkerPoolSpec) -> int:
    """Time a stopping worker gets before SIGKILL: enough for the longest task a hard limit allows,
    or for the soft shutdown, plus a margin for Celery's own shutdown."""
    hard_limits = [t.hard for t in spec.limits.time_limits.values() if t.hard is not None]
    soft_shutdown = spec.worker.soft_shutdown_seconds if spec.worker else 0.0
    longest = max([*hard_limits, soft_shutdown, 0.0])
    return max(MIN_GRACE_SECONDS, math.ceil(longest) + GRACE_MARGIN_SECONDS)


def concurrency_from_args(args: list[str]) -> int | None:
    """The `-c N` / `--concurrency=N` of an adopted Deployment's worker command, if it says."""
    for index, arg in enumerate(args):
        match = CONCURRENCY_ARG.match(arg)
        if not match:
            continue
        value = match.group(1) or (args[index + 1] if index + 1 < len(args) else "")
        return int(value) if value.isdigit() else None
    return None
