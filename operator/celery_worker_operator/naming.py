"""A worker's identity on the broker, in one place: the hostname `<pool>@<member>`.

`member` is the pod name on Kubernetes and `<pool>-<n>` in local mode. Discovery, broadcasts,
drain and telemetry find a pool's workers by this name, so every reader and writer of it is here.
"""

from __future__ import annotations

SEPARATOR = "@"


def worker_hostname(pool: str, member: str) -> str:
    """The `-n` a pool's worker is started with."""
    return f"{pool}{SEPARATOR}{member}"


def pool_of(hostname: str) -> str:
    """The pool a worker belongs to: its hostname up to the first '@'."""
    return hostname.partition(SEPARATOR)[0]


def member_of(hostname: str) -> str:
    """The pod or process a worker runs in: its hostname after the first '@'."""
    return hostname.partition(SEPARATOR)[2]
