"""Many pools on one broker cost the broker about as much as one: counted on the real Redis.

The operator's cost at hundreds of pools (benchmarks/operator_scale.py) rests on two properties:
the pools of a broker share one discovery ping per pass of their limits, and one probe call
measures all their queues. A ping waits its whole reply timeout, so a ping per pool made each
pool wait for all the others' (a pass per broker every few minutes at 500 pools).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from base64 import b64decode
from collections.abc import Iterable, Iterator

import pytest
import redis

from celery_worker_operator.brokers import ProbeRegistry, QueueStats, open_probe
from celery_worker_operator.brokers.coalesce import FRESH_SECONDS
from celery_worker_operator.control import PoolController, PoolSettings
from celery_worker_operator.naming import PoolIdentity
from celery_worker_operator.spec import TransportOptions
from tests.support.redis_cleanup import purge_queues
from tests.support.waiting import wait_for

pytestmark = pytest.mark.brokers
POOLS = 8


class PingCounter:
    """Counts the control pings published under one key prefix (kombu prefixes PUBLISH channels too)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.pings = 0
        self._lock = threading.Lock()
        self._pubsub = redis.Redis.from_url(url).pubsub()
        self._pubsub.psubscribe(**{f"{prefix}*pidbox*": self._count})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _count(self, message: dict[str, bytes]) -> None:
        envelope = json.loads(message["data"])
        if json.loads(b64decode(envelope["body"]))["method"] == "ping":
            with self._lock:
                self.pings += 1

    def stop(self) -> None:
        self._thread.stop()


@pytest.fixture
def ping_counter(redis_url: str) -> Iterator[tuple[PingCounter, str]]:
    prefix = f"cwo-test-{uuid.uuid4().hex[:8]}:"
    counter = PingCounter(redis_url, prefix)
    try:
        yield counter, prefix
    finally:
        counter.stop()


def converge_pools(controller: PoolController, url: str, prefix: str, run: str) -> None:
    controller.use_transport_options(url, {"global_keyprefix": prefix})
    for number in range(POOLS):
        pool = f"shared{run}-{number}"
        controller.converge(url, PoolIdentity("default", pool), PoolSettings(frozenset({pool})))


def test_the_pools_of_a_broker_share_one_discovery_ping(redis_url: str, ping_counter: tuple[PingCounter, str]) -> None:
    counter, prefix = ping_counter
    run = uuid.uuid4().hex[:6]
    shared = PoolController(reply_timeout=0.2)
    one_each = PoolController(reply_timeout=0.2, discovery_max_age=0)
    try:
        converge_pools(shared, redis_url, prefix, run)
        wait_for(lambda: counter.pings, lambda pings: pings >= 1, timeout=5, interval=0.05)
        shared_pings = counter.pings
        converge_pools(one_each, redis_url, prefix, run)  # the counter sees every ping of a pass each
        wait_for(lambda: counter.pings, lambda pings: pings >= shared_pings + POOLS, timeout=5, interval=0.05)
    finally:
        shared.close()
        one_each.close()
    assert shared_pings == 1, f"{POOLS} pools on one broker sent {shared_pings} discovery pings"


class CountingProbe:
    """The real Redis probe, with its calls counted (one call is one pipelined round trip)."""

    def __init__(self, url: str) -> None:
        self.probe, self.calls = open_probe(url), 0

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        self.calls += 1
        return self.probe.stats(queues)

    def close(self) -> None:
        self.probe.close()


def test_one_probe_call_measures_the_queues_of_every_pool_on_a_broker(redis_url: str) -> None:
    opened: list[CountingProbe] = []

    def opener(url: str, management_url: str | None, options: TransportOptions | None) -> CountingProbe:
        opened.append(CountingProbe(url))
        return opened[-1]

    queues = [f"coalesce-{uuid.uuid4().hex[:8]}" for _ in range(POOLS)]
    client = redis.Redis.from_url(redis_url)
    client.lpush(queues[-1], b"{}", b"{}")
    registry = ProbeRegistry(opener)
    try:
        probe = registry.probe(redis_url)
        first = [probe.stats([queue])[queue].depth for queue in queues]  # each queue is new: a call each
        (counting,) = opened
        after_first = counting.calls
        time.sleep(FRESH_SECONDS)  # every number is due again
        again = [probe.stats([queue])[queue].depth for queue in queues]
    finally:
        registry.close()
        purge_queues(redis_url, queues)
    assert first[-1] == again[-1] == 2 and first[:-1] == again[:-1] == [0] * (POOLS - 1)
    assert after_first == POOLS
    assert counting.calls - after_first == 1, (
        f"{POOLS} pools polling one broker made {counting.calls - after_first} calls"
    )
