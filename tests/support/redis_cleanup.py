"""Remove what a test left on the shared Redis for its queues, and nothing else.

kombu keeps a queue in up to four priority lists, a binding set, and prefetched messages in the
shared `unacked` hash + `unacked_index` zset; a killed worker leaves those behind.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from celery_worker_operator.brokers.redis import UNACKED, UNACKED_INDEX, priority_keys, routing_key_of


def purge_queues(redis_url: str, names: Iterable[str]) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        queues = set(names)
        bindings = ("_kombu.binding.{}", "_kombu.binding_permanent.{}")  # keyed by exchange, named after the queue
        keys = [key for name in queues for key in (*priority_keys(name).values(), *(b.format(name) for b in bindings))]
        client.delete(*keys)
        ours = [tag for tag, value in client.hscan_iter(UNACKED) if routing_key_of(value) in queues]
        if ours:
            pipe = client.pipeline()
            pipe.hdel(UNACKED, *ours)
            pipe.zrem(UNACKED_INDEX, *ours)
            pipe.execute()
    finally:
        client.close()
