"""The operator's tests: the operator process set up as the chart installs it, and a fresh pool and
queue name per test (the control plane's fixtures come from tests.support.cluster, for every test)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kubernetes import client

from tests.support.cluster import Cluster
from tests.support.operator_process import OperatorSetup, operator_setup


@pytest.fixture
def operator(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str, tmp_path: Path
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
