"""The Redis probe against the real Redis, real Celery publishing and a real `celery worker`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_worker_operator.brokers import BrokerAuthFailed, BrokerUnavailable, open_probe
from celery_worker_operator.brokers.redis import RedisProbe
from celery_worker_operator.instrument import instrument, uninstrument
from tests.support.celery_app import HOLD, make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.redis_cleanup import purge_queues
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(120)]


@pytest.fixture
def queues(redis_url: str) -> Iterator[list[str]]:
    names = [f"cwo-probe-{uuid.uuid4().hex[:10]}-{suffix}" for suffix in ("a", "b")]
    yield names
    purge_queues(redis_url, names)


@pytest.fixture
def app(redis_url: str) -> Celery:
    return make_app(redis_url)


@pytest.fixture
def stamped(app: Celery) -> Iterator[None]:
    instrument(app)
    yield
    uninstrument()


@pytest.fixture
def probe(redis_url: str) -> Iterator[RedisProbe]:
    probe = RedisProbe(redis_url)
    yield probe
    probe.close()


def send(app: Celery, queue: str, per_priority: int, seconds: float = 0.0) -> None:
    for priority in range(10):
        for _ in range(per_priority):
            app.send_task(HOLD, args=[seconds], queue=queue, priority=priority)


def test_depth_counts_every_priority_bucket(app: Celery, queues: list[str], probe: RedisProbe) -> None:
    first, second = queues
    send(app, first, 1)
    send(app, second, 2)
    stats = probe.stats(queues)
    assert (stats[first].depth, stats[second].depth) == (10, 20)
    # kombu's buckets: 0-2 -> 0, 3-5 -> 3, 6-8 -> 6, 9 -> 9
    assert stats[first].priorities == {0: 3, 3: 3, 6: 3, 9: 1}
    assert stats[second].priorities == {0: 6, 3: 6, 6: 6, 9: 2}
    assert (stats[first].reserved, stats[first].consumers) == (0, None)


def test_reserved_matches_what_the_worker_reports(redis_url: str, app: Celery, queues: list[str]) -> None:
    queue = queues[0]
    probe = open_probe(redis_url)
    with CeleryWorkers("tests.support.celery_app", redis_url) as workers:
        worker = workers.start(f"probe@{uuid.uuid4().hex[:8]}", [queue], concurrency=1, prefetch_multiplier=4)
        workers.wait_ready(app, worker)
        for _ in range(9):
            app.send_task(HOLD, args=[60], queue=queue)

        def both() -> tuple[int | None, int, int]:
            reserved = (app.control.inspect([worker], timeout=1).reserved() or {}).get(worker, [])
            stats = probe.stats([queue])[queue]
            return stats.reserved, len(reserved), stats.depth

        ours, _, depth = wait_for(both, lambda v: v[0] == v[1] > 0, timeout=45)
        assert ours is not None and ours + depth == 8  # 9 sent, 1 running: the rest wait or are prefetched
    probe.close()


def test_stamped_age_is_exact(app: Celery, queues: list[str], probe: RedisProbe, stamped: None) -> None:
    queue = queues[0]
    sent = time.time()
    app.send_task(HOLD, args=[0], queue=queue, priority=5)
    time.sleep(1.5)  # let a real age build up
    app.send_task(HOLD, args=[0], queue=queue, priority=0)
    stats = probe.stats([queue])[queue]
    truth = time.time() - sent
    assert stats.oldest_age_seconds is not None
    assert abs(stats.oldest_age_seconds - truth) <= 1.0
    assert not stats.oldest_age_is_lower_bound


def test_unstamped_age_is_a_growing_lower_bound(app: Celery, queues: list[str], probe: RedisProbe) -> None:
    queue = queues[0]
    sent = time.time()
    app.send_task(HOLD, args=[0], queue=queue)
    first = probe.stats([queue])[queue]
    time.sleep(1.0)
    later = probe.stats([queue])[queue]
    assert first.oldest_age_is_lower_bound and later.oldest_age_is_lower_bound
    assert first.oldest_age_seconds is not None and later.oldest_age_seconds is not None
    assert first.oldest_age_seconds + 0.9 <= later.oldest_age_seconds <= time.time() - sent


def test_outage_is_typed_redacted_and_recovers(tmp_path: Path) -> None:
    password = f"s3cret-{uuid.uuid4().hex}"
    server = PrivateRedis(tmp_path, password)
    server.start()
    probe = open_probe(server.url)
    try:
        make_app(server.url).send_task(HOLD, args=[0], queue="q")
        assert probe.stats(["q"])["q"].depth == 1
        server.stop()
        with pytest.raises(BrokerUnavailable) as caught:
            probe.stats(["q"])
        assert password not in str(caught.value) and password not in repr(caught.value)
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        server.start()
        make_app(server.url).send_task(HOLD, args=[0], queue="q")
        assert probe.stats(["q"])["q"].depth == 1
    finally:
        probe.close()
        server.stop()


def test_wrong_password_is_an_auth_failure(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, "right-password") as server:
        probe = open_probe(f"redis://:not-the-password@127.0.0.1:{server.port}/0")
        with pytest.raises(BrokerAuthFailed) as caught:
            probe.stats(["q"])
        probe.close()
    assert "not-the-password" not in str(caught.value)


def test_tls_with_password_and_db_index(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, f"tls-{uuid.uuid4().hex}", tls=True) as server:
        url = server.url.replace("/0?", "/3?").replace("ssl_cert_reqs=required", "ssl_cert_reqs=CERT_REQUIRED")
        app = make_app(url)
        for priority in (0, 9):
            app.send_task(HOLD, args=[0], queue="q", priority=priority)
        app.close()
        probe = open_probe(url)
        stats = probe.stats(["q"])["q"]
        probe.close()
    assert (stats.depth, stats.priorities[9]) == (2, 1)
