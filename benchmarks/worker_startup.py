"""How long a `celery worker` started by the operator takes to its first task, and what mingle costs.

    .venv/bin/python benchmarks/worker_startup.py [--url redis://127.0.0.1:6379/14] [--workers 1,6] [--repeat 3]

Per repetition: 4 x N tasks wait in a fresh queue, then N workers start at once with the operator's
own command line (workloads/command.py: concurrency 4, prefetch 1, events on), with no extra
arguments and with `--without-mingle --without-gossip`; printed is the seconds from the start to
each worker's first task (each worker takes four at once: every fourth task start), median over the
repetitions, and the 1-minute load average. The gap between the two rows is what mingle's wait for
its neighbours' replies (about 1 s) and gossip cost a new worker; the rest is imports, the app, the
prefork pool and the broker connection, slower when several workers share the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

import redis

from celery_worker_operator.demo.app import app, work
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.local import LocalWorkload

HERE = Path(__file__).resolve().parent
CONCURRENCY = 4
VARIANTS = {"default": [], "no mingle/gossip": ["--without-mingle", "--without-gossip"]}


def make_pool(queue: str, url: str, extra_args: list[str]) -> CeleryWorkerPool:
    worker = {"app": "celery_worker_operator.demo.app:app", "image": "local", "concurrency": CONCURRENCY}
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": queue},
            "spec": {"broker": {"url": url}, "queues": [queue], "worker": {**worker, "extraArgs": extra_args}},
        }
    )


def first_tasks(url: str, workers: int, extra_args: list[str]) -> list[float]:
    """Seconds from starting `workers` workers to each one's first task (every fourth task start)."""
    queue = f"startup-{uuid.uuid4().hex[:6]}"
    key, client = f"{queue}:waits", redis.Redis.from_url(url)
    with app.producer_or_acquire() as producer:
        for _ in range(workers * CONCURRENCY):
            work.apply_async((3.0, 0.0, key), queue=queue, producer=producer)  # sent_at 0: the wait is the start
    workload = LocalWorkload(make_pool(queue, url, extra_args), url, cwd=HERE)
    started = time.time()
    try:
        workload.scale(workers, {})
        deadline = time.monotonic() + 120
        while client.llen(key) < workers * CONCURRENCY and time.monotonic() < deadline:
            time.sleep(0.05)
        starts = sorted(float(line.split(b",")[0]) - started for line in client.lrange(key, 0, -1))
        return starts[::CONCURRENCY]
    finally:
        workload.close()
        client.delete(queue, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--workers", default="1,6", help="comma list: how many workers start at once")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ["CELERY_BROKER_URL"] = args.url
    app.conf.broker_url = args.url
    for workers in (int(n) for n in args.workers.split(",")):
        for name, extra in VARIANTS.items():
            runs, loads = [], []
            for _ in range(args.repeat):
                loads.append(os.getloadavg()[0])
                runs.append(first_tasks(args.url, workers, extra))
            medians = [statistics.median(run[i] for run in runs) for i in range(min(map(len, runs)))]
            print(
                f"{workers} worker(s), {name:17} first task after {', '.join(f'{m:.2f}' for m in medians)} s "
                f"(median of {args.repeat}; load {min(loads):.1f}-{max(loads):.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
