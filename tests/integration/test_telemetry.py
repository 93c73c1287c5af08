"""Telemetry against real `celery worker` processes on the real Redis and RabbitMQ.

Every test uses its own pool and queue names, so other runs on the same servers never count here.
Workers send heartbeats every second, which keeps the liveness checks to a few seconds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery

from celery_worker_operator.telemetry import EventMonitor
from tests.support.event_app import FAIL, SLEEP, make_app
from tests.support.event_workers import Workers, wait_until
from tests.support.private_redis import PrivateRedis

pytestmark = pytest.mark.brokers

STARTUP = 45.0  # a celery worker on a loaded 2-core machine can take this long to come up


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


@pytest.fixture
def workers(broker_url: str) -> Iterator[Workers]:
    started = Workers(broker_url)
    yield started
    started.close()


@pytest.fixture
def monitor(broker_url: str) -> Iterator[EventMonitor]:
    watching = EventMonitor(broker_url, window=4.0).start()
    assert watching.wait_connected(10), watching.last_error
    yield watching
    watching.stop()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_ready(app: Celery, *hostnames: str) -> None:
    """Until every worker answers a ping: then it consumes, whether or not a monitor watched it start."""
    wait_until(lambda: len(app.control.ping(destination=list(hostnames), timeout=0.5)) == len(hostnames), STARTUP)


def send_steadily(app: Celery, queue: str, rate: float, seconds: float) -> float:
    """Send 0.2 s sleeps at `rate` per second, paced on the clock; returns the rate achieved."""
    count, start = int(rate * seconds), time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        app.send_task(SLEEP, args=(0.2,), queue=queue)
    return (count - 1) / (time.monotonic() - start)


def test_rates_and_service_times_per_pool_and_never_mixed(broker_url: str, workers: Workers) -> None:
    steady, other = unique("steady"), unique("other")
    workers.start(f"{steady}@w1", f"{steady}-q")
    workers.start(f"{other}@w1", f"{other}-q", heartbeat=30)  # seen only thanks to the wakeup
    app = make_app(broker_url, sent_events=True)
    wait_ready(app, f"{steady}@w1", f"{other}@w1")
    monitor = EventMonitor(broker_url, window=4.0).start()
    try:
        assert monitor.wait_connected(10), monitor.last_error
        wait_until(lambda: monitor.snapshot(other).live_workers == 1, 3)  # not after its 30 s heartbeat
        sent_rate = send_steadily(app, f"{steady}-q", rate=5, seconds=6)
        time.sleep(0.3)  # the last events are on their way
        measured = monitor.snapshot(steady, queues=[f"{steady}-q"])
        assert measured.arrival_rate == pytest.approx(sent_rate, rel=0.2)
        assert measured.service_time_mean == pytest.approx(0.2, rel=0.2)
        assert measured.wait_mean is not None and measured.sent_wait_mean is not None
        assert measured.task_events is True
        app.send_task(FAIL, queue=f"{other}-q")
        app.send_task(SLEEP, args=(0.05,), queue=f"{other}-q")
        apart = wait_until(lambda: (o := monitor.snapshot(other)).completed == 2 and o, 10)
        assert (set(apart.workers), set(apart.tasks), apart.failure_rate > 0) == ({f"{other}@w1"}, {FAIL, SLEEP}, True)
        assert apart.service_time_mean is not None and apart.service_time_mean < 0.15
        steady_now = monitor.snapshot(steady)
        assert (set(steady_now.workers), set(steady_now.tasks), steady_now.failure_rate) == (
            {f"{steady}@w1"},
            {SLEEP},
            0,
        )
    finally:
        monitor.stop()


def test_a_killed_worker_goes_offline_and_a_new_one_comes_online(
    broker_url: str, workers: Workers, monitor: EventMonitor
) -> None:
    pool = unique("live")
    first = workers.start(f"{pool}@w1", f"{pool}-q", heartbeat=1)
    wait_until(lambda: monitor.snapshot(pool).workers.get(first), STARTUP)
    second = workers.start(f"{pool}@w2", f"{pool}-q", heartbeat=1)
    wait_until(lambda: monitor.snapshot(pool).live_workers == 2, STARTUP)
    assert monitor.snapshot(pool).workers[second].online
    killed_at = time.monotonic()
    workers.kill(first)
    wait_until(lambda: not monitor.snapshot(pool).workers[first].online, 2 * 1 + 1 + 2)
    assert time.monotonic() - killed_at <= 2 * 1 + 1  # two missed heartbeats of 1 s, plus 1 s
    after = monitor.snapshot(pool)
    assert (after.live_workers, after.workers[second].online) == (1, True)


def test_the_monitor_resumes_by_itself_after_a_broker_restart() -> None:
    pool = unique("restart")
    with PrivateRedis() as redis:
        workers = Workers(redis.url)
        monitor = EventMonitor(redis.url, window=10.0).start()
        try:
            hostname = workers.start(f"{pool}@w1", f"{pool}-q", heartbeat=1)
            assert monitor.wait_connected(10), monitor.last_error
            wait_until(lambda: monitor.snapshot(pool).live_workers == 1, STARTUP)
            redis.restart()
            restarted = time.time()
            wait_until(lambda: monitor.connects >= 2 and monitor.connected, 15)
            wait_until(lambda: (monitor.snapshot(pool).workers[hostname].last_heartbeat or 0) > restarted, 30)
            make_app(redis.url).send_task(SLEEP, args=(0.01,), queue=f"{pool}-q")
            wait_until(lambda: monitor.snapshot(pool).completed >= 1, 15)
            assert monitor.last_error is not None  # the loss was seen, and logged without a password
        finally:
            monitor.stop()
            workers.close()
