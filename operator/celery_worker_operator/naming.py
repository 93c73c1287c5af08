"""A worker's identity on the broker, in one place: the hostname `<pool>.<namespace>@<member>`.

`member` is the pod name on Kubernetes and `<pool>-<n>` in local mode (whose namespace is the pool
file's metadata.namespace, `default` unless it says). Two namespaces may both run a pool `orders`
on one broker, so the pool's name alone does not tell whose a worker is: the part before '@' names
both. Pool names and namespaces are DNS-1123 labels (no '.'), so that part splits one way only.
Discovery, broadcasts, drain and telemetry find a pool's workers by this rule and no other.

Migration: workers started before namespaces were in the name are called `<pool>@<member>`
(legacy). Such a name alone could be any namespace's pool, so a pool claims a legacy worker only
when its member is one of the pool's own pods (or processes): a pod of namespace A is never
counted, limited or drained by namespace B's pool of the same name. Legacy names go away as the
pods roll (the new name is in the pod template, so the first rollout replaces them all).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

SEPARATOR = "@"
NAMESPACE_SEPARATOR = "."


@dataclass(frozen=True)
class PoolIdentity:
    """Pool `name` in `namespace`, as its workers are named on the broker."""

    namespace: str
    name: str

    @property
    def key(self) -> str:
        """The part of every worker hostname before '@': what groups a pool's workers on a shared broker."""
        return f"{self.name}{NAMESPACE_SEPARATOR}{self.namespace}"

    def __str__(self) -> str:
        return self.key

    def hostname(self, member: str) -> str:
        """The `-n` a worker of this pool is started with."""
        return f"{self.key}{SEPARATOR}{member}"

    def legacy_hostnames(self, members: Iterable[str]) -> frozenset[str]:
        """The names the pool's own `members` had before the namespace was in them (`<pool>@<member>`)."""
        return frozenset(f"{self.name}{SEPARATOR}{member}" for member in members)

    def workers(self, hostnames: Iterable[str], members: Iterable[str] = ()) -> list[str]:
        """The hostnames, sorted, of workers that are this pool's: named after it, or a legacy name of
        one of its own `members` (without members no legacy worker is claimed)."""
        legacy = self.legacy_hostnames(members)
        return sorted(h for h in hostnames if pool_of(h) == self.key or h in legacy)

    def hostname_of(self, member: str, live: Collection[str]) -> str:
        """The hostname member `member` answers to: its legacy name while a worker of that name is
        among the `live` ones (its pod has not rolled yet), else the current one."""
        (legacy,) = self.legacy_hostnames((member,))
        return legacy if legacy in live else self.hostname(member)


def pool_of(hostname: str) -> str:
    """What a worker's hostname groups it under: the part before the first '@' (a `PoolIdentity.key`,
    or a bare pool name for a legacy worker)."""
    return hostname.partition(SEPARATOR)[0]


def member_of(hostname: str) -> str:
    """The pod or process a worker runs in: its hostname after the first '@'."""
    return hostname.partition(SEPARATOR)[2]
