"""Where a pool's replicas live: a Kubernetes Deployment, or local `celery worker` processes.

Both answer the same small protocol, so the reconciler cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class WorkloadState:
    """The workload as it is now.

    replicas: the count the workload is set to (a Deployment's spec.replicas).
    members: the names that follow '@' in the workers' hostnames (pod or process names, naming.py).
    concurrency: task slots per worker, when the workload can tell (managed spec or `-c` argument).
    crash_loop: what the last worker said before exiting, while workers keep exiting unasked.
    replicas_declared_by: other field managers that apply the replica count (a GitOps tool whose
        manifest sets `spec.replicas`): scaling would fight them, so the pool does not scale.
    started: when each member started, seconds since the epoch (a pod's creationTimestamp, a process's
        start): where its worker's start-up begins (startup.py).
    """

    replicas: int
    ready_replicas: int
    members: tuple[str, ...] = ()
    concurrency: int | None = None
    selector: str | None = None
    crash_loop: str | None = None
    replicas_declared_by: tuple[str, ...] = ()
    started: Mapping[str, float] = field(default_factory=dict)


def removal_order(members: Sequence[str], load: Mapping[str, int]) -> list[str]:
    """Who goes first on a scale-down: members with no heartbeat yet (still starting, as a
    ReplicaSet removes unready pods first), then the least loaded."""
    return sorted(members, key=lambda member: (member in load, load.get(member, 0)))


class FieldConflict(Exception):
    """Another field manager applies a field the operator writes: forcing it would fight that
    manager on every sync, so the write is refused and reported instead."""


class WorkloadMissing(Exception):
    """The workload does not exist (yet): an adopted Deployment that is not there, say."""


class WorkloadNotOwned(WorkloadMissing):
    """The managed Deployment's name is taken by one the pool does not own: the operator leaves it alone,
    or a pool named after any Deployment would take it over (its pods, its ServiceAccount)."""


class Workload(Protocol):
    def observe(self) -> WorkloadState:
        """The current state; raises WorkloadMissing when there is nothing to scale."""
        ...

    def scale(self, replicas: int, load: Mapping[str, int]) -> None:
        """Set the replica count. On the way down, members with the lowest `load` (busy + reserved
        tasks, by member name) must be the ones removed; members missing from `load` are unknown."""
        ...
