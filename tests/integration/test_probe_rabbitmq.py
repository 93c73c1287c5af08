"""The RabbitMQ probe against the real RabbitMQ (AMQP + management API), Celery and a real worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from celery import Celery

from celery_worker_operator.brokers import BrokerAuthFailed, BrokerUnavailable, QueueStats
from celery_worker_operator.brokers.rabbitmq import RabbitMQProbe
from celery_worker_operator.instrument import instrument, uninstrument
from tests.support.celery_app import HOLD, make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.rabbitmq_admin import TempUser, delete_queues, temporary_user
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(120)]


@pytest.fixture
def queues(amqp_url: str) -> Iterator[list[str]]:
    names = [f"cwo-probe-{uuid.uuid4().hex[:10]}-{suffix}" for suffix in ("a", "b")]
    yield names
    delete_queues(amqp_url, names)


@pytest.fixture
def app(amqp_url: str) -> Iterator[Celery]:
    app = make_app(amqp_url)
    yield app
    app.close()


@pytest.fixture
def probe(amqp_url: str, management_url: str) -> Iterator[RabbitMQProbe]:
    probe = RabbitMQProbe(amqp_url, management_url=management_url)
    yield probe
    probe.close()


@pytest.fixture
def user(management_url: str) -> Iterator[TempUser]:
    with temporary_user(management_url) as user:
        yield user


def one(probe: RabbitMQProbe, queue: str) -> QueueStats:
    return probe.stats([queue])[queue]


def test_depth_per_queue_and_missing_queues(app: Celery, queues: list[str], probe: RabbitMQProbe) -> None:
    first, second = queues
    for priority in range(10):
        app.send_task(HOLD, args=[0], queue=first, priority=priority)
        for _ in range(2):
            app.send_task(HOLD, args=[0], queue=second, priority=priority)
    missing = f"cwo-probe-{uuid.uuid4().hex}-missing"
    stats = wait_for(lambda: probe.stats([*queues, missing]), lambda s: s[second].depth == 20, timeout=10)
    assert stats[first].depth == 10
    assert (stats[first].consumers, stats[first].exists) == (0, True)
    assert (stats[missing].depth, stats[missing].exists) == (0, False)


def test_reserved_matches_what_the_worker_reports(
    amqp_url: str, app: Celery, queues: list[str], probe: RabbitMQProbe
) -> None:
    queue = queues[0]
    with CeleryWorkers("tests.support.celery_app", amqp_url) as workers:
        worker = workers.start(f"probe@{uuid.uuid4().hex[:8]}", [queue], concurrency=1, prefetch_multiplier=4)
        workers.wait_ready(app, worker)
        for _ in range(9):
            app.send_task(HOLD, args=[60], queue=queue)

        def both() -> tuple[int | None, int, QueueStats]:
            reserved = (app.control.inspect([worker], timeout=1).reserved() or {}).get(worker, [])
            stats = one(probe, queue)
            return stats.reserved, len(reserved), stats

        # The management API refreshes its numbers every 5 s, hence the long wait.
        _, _, stats = wait_for(both, lambda v: v[0] == v[1] > 0, timeout=45, interval=0.5)
        assert stats.consumers == 1 and stats.rates is not None


def test_stamped_age_from_the_management_api(app: Celery, queues: list[str], probe: RabbitMQProbe) -> None:
    queue = queues[0]
    instrument(app)
    try:
        sent = time.time()
        app.send_task(HOLD, args=[0], queue=queue)
        time.sleep(1.5)  # let a real age build up
        app.send_task(HOLD, args=[0], queue=queue)
    finally:
        uninstrument()
    stats = wait_for(lambda: one(probe, queue), lambda s: s.oldest_age_seconds is not None, timeout=15)
    truth = time.time() - sent
    assert stats.oldest_age_seconds is not None and abs(stats.oldest_age_seconds - truth) <= 1.0


def test_outage_is_typed_redacted_and_recovers(amqp_url: str, queues: list[str], user: TempUser) -> None:
    upstream = urlsplit(amqp_url)
    with TcpProxy((upstream.hostname or "127.0.0.1", upstream.port or 5672)) as proxy:
        probe = RabbitMQProbe(f"amqp://{user.name}:{user.password}@127.0.0.1:{proxy.port}//", timeout=3)
        try:
            assert one(probe, queues[0]).exists is False
            proxy.cut()
            with pytest.raises(BrokerUnavailable) as caught:
                probe.stats(queues)
            assert user.password not in str(caught.value) and user.password not in repr(caught.value)
            proxy.restore()
            assert one(probe, queues[0]).depth == 0
        finally:
            probe.close()


def test_wrong_password_is_a_clear_auth_failure(amqp_url: str, user: TempUser) -> None:
    port = urlsplit(amqp_url).port or 5672
    wrong = f"wrong-{uuid.uuid4().hex}"
    probe = RabbitMQProbe(f"amqp://{user.name}:{wrong}@127.0.0.1:{port}//")
    with pytest.raises(BrokerAuthFailed) as caught:
        probe.stats(["celery"])
    probe.close()
    assert f"refused user {user.name!r}" in str(caught.value)
    assert wrong not in str(caught.value)


def test_wrong_management_password_is_an_auth_failure(amqp_url: str, management_url: str, user: TempUser) -> None:
    parts = urlsplit(management_url)
    wrong = f"wrong-{uuid.uuid4().hex}"
    probe = RabbitMQProbe(amqp_url, management_url=f"http://{user.name}:{wrong}@{parts.hostname}:{parts.port}")
    with pytest.raises(BrokerAuthFailed) as caught:
        probe.stats(["celery"])
    probe.close()
    assert "401" in str(caught.value) and wrong not in str(caught.value)
