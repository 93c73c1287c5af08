"""At most two connections per broker URL, whatever the operator does on it (issue 20, DESIGN's
"one broker connection per broker URL"): several pools on one Redis URL and one RabbitMQ vhost,
real workers sending events, and broadcasts with replies in flight (discovery pings, inspections,
rate limits, add/cancel consumer) while the probe measures; and none once the last pool is gone.
Connections are counted on the brokers (CLIENT LIST, the management API), this process's only.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.pool_loop import SharedResources
from celery_worker_operator.reconciler import Sources
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.local import LocalWorkload
from tests.support.broker_connections import rabbitmq_connections, redis_connections
from tests.support.celery_app import make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.control_app import RECORD
from tests.support.rabbitmq_admin import temporary_vhost
from tests.support.redis_cleanup import purge_queues
from tests.support.waiting import wait_for

pytestmark = pytest.mark.brokers

NAMESPACE = "conns"
MOST = 2  # connections per broker URL: commands, and the event stream
ELSEWHERE = "conns-elsewhere"  # the queue workers start on: converging adds their pool's and cancels this one


def pool(name: str, queue: str) -> CeleryWorkerPool:
    """A pool with a rate limit to keep applied (the tests hand the real URL to the resources)."""
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "broker": {"url": "redis://127.0.0.1/0"},
                "queues": [queue],
                "worker": {"app": "tests.support.control_app", "image": "local"},
                "limits": {"rateLimits": {RECORD: "30/m"}},
            },
        }
    )


class Broker:
    """One broker URL in the test: its pools (the first with a real worker), and the counting."""

    def __init__(self, url: str, count: Callable[[], Counter[str]]) -> None:
        self.url, self.count = url, count
        run = uuid.uuid4().hex[:6]
        self.pools = [pool(f"c{run}{i}", f"conns-{run}-{i}") for i in range(3)]
        self.sources: dict[str, Sources] = {}

    @property
    def worker(self) -> str:
        return f"{self.pools[0].metadata.name}.{NAMESPACE}@w1"

    @property
    def queues(self) -> list[str]:
        return [queue for p in self.pools for queue in p.spec.queues]

    def use(self, shared: SharedResources) -> None:
        """A pass's worth of use for each pool: probe, event stream, a control pass."""
        for p in self.pools:
            sources = self.sources.setdefault(
                p.metadata.name,
                shared.sources(NAMESPACE, p.metadata.name, (self.url, None), LocalWorkload(p, self.url)),
            )
            sources.probe.stats(p.spec.queues)
            assert sources.limits is not None
            sources.limits(p, 1, ())

    def applied(self) -> bool:
        first = self.pools[0]
        limits = self.sources[first.metadata.name].limits
        assert limits is not None
        return limits(first, 1, ()).reason == "Applied"


@pytest.fixture
def brokers(redis_url: str, amqp_url: str, management_url: str) -> Iterator[list[Broker]]:
    db = int(urlsplit(redis_url).path.strip("/") or 0)
    with temporary_vhost(management_url) as vhost:
        vhost_url = urlsplit(amqp_url)._replace(path=f"/{vhost}").geturl()
        on_redis = Broker(redis_url, lambda: redis_connections(redis_url, db))
        on_rabbitmq = Broker(vhost_url, lambda: rabbitmq_connections(management_url, vhost))
        try:
            yield [on_redis, on_rabbitmq]
        finally:
            purge_queues(redis_url, [*on_redis.queues, ELSEWHERE])


def test_two_connections_per_broker_url_while_events_flow_and_broadcasts_are_answered(
    brokers: list[Broker],
) -> None:
    shared = SharedResources()
    running = threading.Event()
    with CeleryWorkers("tests.support.control_app", brokers[0].url) as on_redis:
        on_rabbitmq = CeleryWorkers("tests.support.control_app", brokers[1].url)
        try:
            for workers, broker in zip((on_redis, on_rabbitmq), brokers, strict=True):
                # on another queue than its pool's: the control pass adds one consumer and cancels the other
                workers.start(broker.worker, [ELSEWHERE], extra_args=["-E"])
            for workers, broker in zip((on_redis, on_rabbitmq), brokers, strict=True):
                client = make_app(broker.url)
                workers.wait_ready(client, broker.worker)
                for n in range(10):  # task events flow
                    client.send_task(RECORD, args=["/dev/null", f"t{n}"], queue=broker.pools[0].spec.queues[0])
            peaks = busy_brokers(shared, brokers, running)
        finally:
            running.set()
            on_rabbitmq.close()
    for broker in brokers:
        assert max(sum(found.values()) for found in peaks[broker.url]) <= MOST, (broker.url, peaks[broker.url])
    for broker in brokers:
        for p in broker.pools:
            shared.release(NAMESPACE, p.metadata.name)
    try:
        for broker in brokers:  # RabbitMQ's management API lists connections a few seconds late
            wait_for(broker.count, lambda found: not found, timeout=30, interval=1.0)
    finally:
        shared.close()


Counts = dict[str, list[Counter[str]]]  # broker URL -> the connections seen at each look


def busy_brokers(shared: SharedResources, brokers: list[Broker], stop: threading.Event) -> Counts:
    """Keep every pool probing and converging in a thread; once events flow and the first pool's
    limits are applied on both brokers, count each broker's connections a few times."""
    errors: list[BaseException] = []

    def keep_busy() -> None:
        try:
            while not stop.is_set():
                for broker in brokers:
                    broker.use(shared)
                stop.wait(0.2)
        except BaseException as error:  # surfaced below: a failing pass must fail the test
            errors.append(error)
            raise

    for broker in brokers:
        broker.use(shared)
    thread = threading.Thread(target=keep_busy, daemon=True)
    thread.start()
    try:
        for broker in brokers:
            monitor = shared.telemetry.monitor(broker.url)
            wait_for(lambda m=monitor: m.events, lambda events: events > 0, timeout=60)  # type: ignore[misc]
            wait_for(broker.applied, bool, timeout=60)
        peaks: Counts = {broker.url: [] for broker in brokers}
        for _ in range(5):
            for broker in brokers:
                peaks[broker.url].append(broker.count())
            stop.wait(1.0)
        for broker in brokers:
            assert any(found for found in peaks[broker.url]), f"no connection of ours seen on {broker.url}"
        return peaks
    finally:
        stop.set()
        thread.join(30)
        assert not errors, errors
