"""A worker's identity on the broker: `<pool>.<namespace>@<member>`, and legacy `<pool>@<member>` names
claimed only by the pool whose own member they name."""

from __future__ import annotations

import pytest

from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.naming import PoolIdentity, member_of, pool_of

A, B = PoolIdentity("team-a", "orders"), PoolIdentity("team-b", "orders")


def test_two_namespaces_pools_of_one_name_have_distinct_readable_worker_names() -> None:
    assert (A.hostname("orders-7d9-x2"), B.hostname("orders-7d9-x2")) == (
        "orders.team-a@orders-7d9-x2",
        "orders.team-b@orders-7d9-x2",
    )
    assert (pool_of(A.hostname("p")), member_of(A.hostname("p"))) == ("orders.team-a", "p")


def test_a_pool_selects_its_own_workers_and_none_of_the_other_namespaces() -> None:
    seen = [A.hostname("a1"), B.hostname("b1"), "orders@a1", "orders@b1", "ordersx.team-a@a2", "other.team-a@a1"]
    assert A.workers(seen, members=["a1"]) == ["orders.team-a@a1", "orders@a1"]
    assert B.workers(seen, members=["b1"]) == ["orders.team-b@b1", "orders@b1"]


def test_a_legacy_name_is_claimed_only_through_the_pools_own_members() -> None:
    legacy = ["orders@a1", "orders@b1"]
    assert A.workers(legacy) == [], "without members no legacy worker is anyone's"
    assert A.workers(legacy, members=["a1", "a2"]) == ["orders@a1"]
    assert A.legacy_hostnames(["a1"]) == {"orders@a1"}


def test_a_member_answers_to_its_legacy_name_only_while_a_worker_of_that_name_is_live() -> None:
    assert A.hostname_of("a1", live={"orders@a1"}) == "orders@a1"
    assert A.hostname_of("a1", live={"orders.team-a@a1"}) == "orders.team-a@a1"
    assert A.hostname_of("a1", live=set()) == "orders.team-a@a1"


@pytest.mark.parametrize("namespace", [None, "team-a"])
def test_a_pool_knows_its_identity_and_a_file_without_namespace_is_in_default(namespace: str | None) -> None:
    metadata = {"name": "orders", **({"namespace": namespace} if namespace else {})}
    pool = parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": metadata,
            "spec": {"broker": {"url": "redis://localhost:6379/0"}, "queues": ["q"], "scaleTargetRef": {"name": "d"}},
        }
    )
    assert pool.identity == PoolIdentity(namespace or "default", "orders")
