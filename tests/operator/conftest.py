"""The real control plane's fixtures (tests.support.cluster) for the operator's tests, the operator
process set up as the chart installs it, and a fresh pool and queue name per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kubernetes import client

from tests.support.cluster import (  # noqa: F401  (fixtures and the build-before-tests hook)
    Cluster,
    kube_api,
    kube_cluster,
    kube_namespace,
    kubelet,
    pytest_collection_finish,
)
from tests.support.operator_process import OperatorSetup, operator_setup


@pytest.fixture
def operator(
    kube_cluster: Cluster,  # noqa: F811  (the fixtures imported above)
    kube_api: client.ApiClient,  # noqa: F811
    kube_namespace: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[OperatorSetup]:
    with operator_setup(kube_cluster, kube_api, kube_namespace, tmp_path) as setup:
        yield setup


@pytest.fixture
def names(redis_url: str) -> Iterator[tuple[str, str]]:
    """A pool name and its queue, unique per test; the queue's keys (and the ledger's) go afterwards."""
    suffix = uuid.uuid4().hex[:6]
    name, queue = f"pool-{suffix}", f"q-{suffix}"
    yield name, queue
    redis.Redis.from_url(redis_url).delete(queue, f"{queue}:started", f"{queue}:ended")
