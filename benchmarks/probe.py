"""Our Redis probe against a one-connection-per-queue LLEN loop (how KEDA's Redis scaler queries).

    .venv/bin/python benchmarks/probe.py [--url redis://127.0.0.1:6379/15] [--queues 200] [--polls 15]

Puts `--queues` queues of real Celery messages (spread over the priority buckets, publish-stamped)
on one Redis, then times one poll of all of them, in turns, in this one run:
  ours         RedisProbe.stats(all queues): LLEN + LINDEX of 4 priority lists per queue in one
               pipelined round trip, plus the prefetched tally; it does strictly more than the others;
  keda         per queue, a new connection and one LLEN (KEDA: one client per trigger, one list);
  keda-pooled  the same with the per-queue connections kept open across polls (KEDA's best case).
Reported: median milliseconds per poll and the ratio to ours. Target (issue 4): keda/ours >= 10.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

import redis
from celery import Celery

from celery_worker_operator import instrument
from celery_worker_operator.brokers.redis import RedisProbe, priority_keys


def fill(url: str, names: list[str]) -> None:
    """Three real Celery messages per queue, at priorities 0, 4 and 9 (three different lists)."""
    app = instrument(Celery("bench", broker=url, set_as_current=False))
    with app.producer_or_acquire() as producer:
        for name in names:
            for priority in (0, 4, 9):
                app.send_task("bench.task", args=[1], queue=name, priority=priority, producer=producer)
    app.close()


def clean(url: str, names: list[str]) -> None:
    client = redis.Redis.from_url(url)
    bindings = [f"_kombu.{kind}.{name}" for name in names for kind in ("binding", "binding_permanent")]
    client.delete(*[key for name in names for key in priority_keys(name).values()], *bindings)
    client.close()


def keda_poll(url: str, names: list[str]) -> Callable[[], object]:
    def poll() -> list[int]:
        lengths = []
        for name in names:
            client = redis.Redis.from_url(url)
            lengths.append(client.llen(name))
            client.close()
        return lengths

    return poll


def keda_pooled_poll(url: str, names: list[str]) -> Callable[[], object]:
    clients = {name: redis.Redis.from_url(url) for name in names}
    return lambda: [clients[name].llen(name) for name in names]


def median_ms(poll: Callable[[], object], samples: list[float]) -> None:
    start = time.perf_counter()
    poll()
    samples.append((time.perf_counter() - start) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--queues", type=int, default=200)
    parser.add_argument("--polls", type=int, default=15)
    args = parser.parse_args()
    prefix = f"cwo-bench-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}-{n}" for n in range(args.queues)]
    probe = RedisProbe(args.url)
    try:
        fill(args.url, names)
        stats = probe.stats(names)
        assert all(stats[name].depth == 3 for name in names), "every queue should hold its 3 messages"
        polls = {
            "ours": lambda: probe.stats(names),
            "keda": keda_poll(args.url, names),
            "keda-pooled": keda_pooled_poll(args.url, names),
        }
        samples: dict[str, list[float]] = {label: [] for label in polls}
        for poll in polls.values():
            poll()  # warm up: connections, caches
        for _ in range(args.polls):  # in turns, so load on the machine hits every contender alike
            for label, poll in polls.items():
                median_ms(poll, samples[label])
    finally:
        probe.close()
        clean(args.url, names)
    ours = statistics.median(samples["ours"])
    print(f"{args.queues} queues x 3 messages on {args.url}; median of {args.polls} polls each")
    print(f"{'contender':12} {'ms/poll':>8} {'x ours':>7}")
    for label, values in samples.items():
        print(f"{label:12} {statistics.median(values):8.2f} {statistics.median(values) / ours:7.1f}")
    ratio = statistics.median(samples["keda"]) / ours
    print(f"ratio keda/ours = {ratio:.1f}x (target >= 10x): {'MET' if ratio >= 10 else 'NOT MET'}")


if __name__ == "__main__":
    main()
