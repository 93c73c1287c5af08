"""Telemetry against real `celery worker` processes on the real Redis and RabbitMQ.

Every test uses its own pool and queue names, so other runs on the same servers never count here.
Workers send heartbeats every second (unless a test says otherwise), which keeps the liveness
checks to a few seconds; all polling is poll-until with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_worker_operator.telemetry import EventMonitor, PoolTelemetry, TelemetryMonitors
from tests.support.celery_procs import CeleryWorkers
from tests.support.event_app import BROKER_ENV, FAIL, SLEEP, make_app
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_for

pytestmark = pytest.mark.brokers


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


@pytest.fixture
def workers(broker_url: str) -> Iterator[CeleryWorkers]:
    with CeleryWorkers("tests.support.event_app", broker_url, BROKER_ENV) as started:
        yield started


@pytest.fixture
def monitor(broker_url: str) -> Iterator[EventMonitor]:
    watching = EventMonitor(broker_url, window=4.0).start()
    assert watching.wait_connected(10), watching.last_error
    yield watching
    watching.stop()


def start(workers: CeleryWorkers, hostname: str, *, heartbeat: int = 1) -> str:
    """A worker with task events on (-E), two slots, on its pool's own queue."""
    queue = f"{hostname.partition('@')[0]}-q"
    return workers.start(hostname, [queue], concurrency=2, extra_args=["-E", "--heartbeat-interval", str(heartbeat)])


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def watch(monitor: EventMonitor, pool: str, ok: Callable[[PoolTelemetry], bool], timeout: float) -> PoolTelemetry:
    return wait_for(lambda: monitor.snapshot(pool), ok, timeout, interval=0.05)


def send_steadily(app: Celery, queue: str, rate: float, seconds: float) -> float:
    """Send 0.2 s sleeps at `rate` per second, paced on the clock; returns the rate achieved."""
    count, begin = int(rate * seconds), time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, begin + i / rate - time.monotonic()))
        app.send_task(SLEEP, args=(0.2,), queue=queue)
    return (count - 1) / (time.monotonic() - begin)


def test_rates_and_service_times_per_pool_and_never_mixed(broker_url: str, workers: CeleryWorkers) -> None:
    steady, other = unique("steady"), unique("other")
    app = make_app(broker_url, sent_events=True)
    for hostname in (start(workers, f"{steady}@w1"), start(workers, f"{other}@w1", heartbeat=30)):
        workers.wait_ready(app, hostname)
    monitor = EventMonitor(broker_url, window=4.0).start()  # after the workers: it must wake them up
    try:
        assert monitor.wait_connected(10), monitor.last_error
        watch(monitor, other, lambda t: t.live_workers == 1, 3)  # not after its 30 s heartbeat
        sent_rate = send_steadily(app, f"{steady}-q", rate=5, seconds=6)
        time.sleep(0.3)  # the last events are on their way
        measured = monitor.snapshot(steady, queues=[f"{steady}-q"])
        assert measured.arrival_rate == pytest.approx(sent_rate, rel=0.2)
        assert measured.service_time_mean == pytest.approx(0.2, rel=0.2)
        assert measured.wait_mean is not None and measured.sent_wait_mean is not None
        assert measured.task_events is True
        app.send_task(FAIL, queue=f"{other}-q")
        app.send_task(SLEEP, args=(0.05,), queue=f"{other}-q")
        apart = watch(monitor, other, lambda t: t.completed == 2, 10)
        assert (set(apart.workers), set(apart.tasks)) == ({f"{other}@w1"}, {FAIL, SLEEP})
        assert apart.completion_rate and apart.failure_rate == pytest.approx(apart.completion_rate / 2)  # one failed
        assert apart.service_time_mean is not None and apart.service_time_mean < 0.15
        again = monitor.snapshot(steady)
        assert (set(again.workers), set(again.tasks), again.failure_rate) == ({f"{steady}@w1"}, {SLEEP}, 0)
    finally:
        monitor.stop()


def test_a_killed_worker_goes_offline_and_a_new_one_comes_online(
    broker_url: str, workers: CeleryWorkers, monitor: EventMonitor
) -> None:
    pool = unique("live")
    first = start(workers, f"{pool}@w1")
    watch(monitor, pool, lambda t: first in t.workers, 45)
    second = start(workers, f"{pool}@w2")
    assert watch(monitor, pool, lambda t: t.live_workers == 2, 45).workers[second].online
    killed_at = time.monotonic()
    workers.stop(first)  # kill -9 of the process group
    after = watch(monitor, pool, lambda t: not t.workers[first].online, 2 * 1 + 1 + 2)
    assert time.monotonic() - killed_at <= 2 * 1 + 1  # two missed heartbeats of 1 s, plus 1 s
    assert (after.live_workers, after.workers[second].online) == (1, True)


def test_the_monitor_resumes_by_itself_after_a_broker_restart(tmp_path: Path) -> None:
    pool, password = unique("restart"), uuid.uuid4().hex
    with (
        PrivateRedis(tmp_path, password) as redis,
        CeleryWorkers("tests.support.event_app", redis.url, BROKER_ENV) as workers,
    ):
        monitor = EventMonitor(redis.url, window=10.0).start()
        try:
            hostname = start(workers, f"{pool}@w1")
            assert monitor.wait_connected(10), monitor.last_error
            watch(monitor, pool, lambda t: t.live_workers == 1, 45)
            redis.stop()
            redis.start()
            restarted = time.time()
            wait_for(lambda: (monitor.connects, monitor.connected), lambda c: c[0] >= 2 and c[1], 15)
            watch(monitor, pool, lambda t: (t.workers[hostname].last_heartbeat or 0) > restarted, 30)  # worker is back
            make_app(redis.url).send_task(SLEEP, args=(0.01,), queue=f"{pool}-q")
            watch(monitor, pool, lambda t: t.completed >= 1, 15)
            assert monitor.last_error is not None and password not in monitor.last_error
            assert password not in monitor.name
        finally:
            monitor.stop()


def test_pools_on_one_broker_share_one_monitor(redis_url: str) -> None:
    monitors = TelemetryMonitors(window=4.0)
    try:
        shared = monitors.monitor(redis_url)
        assert monitors.monitor(redis_url) is shared
        assert shared.wait_connected(10), shared.last_error
        assert monitors.snapshot(redis_url, unique("nobody")).live_workers == 0
    finally:
        monitors.stop()
    assert not shared.connected
