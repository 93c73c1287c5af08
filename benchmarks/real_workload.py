"""Real workers on real Redis: our local mode against a KEDA-style process scaler, tuned and default.

    .venv/bin/python benchmarks/real_workload.py [--url redis://127.0.0.1:6379/14] [--workloads NAMES] [--tail 45]
        [--scalers ours,ours-measured,keda-tuned,keda,limit] [--worker-args="--without-mingle --without-gossip"]
        [--decisions]   (also print each of our scale decisions with its terms, seconds from the first publish)
    .venv/bin/python benchmarks/real_workload.py --reaction 10

Each workload (burst-trickle: 240 tasks at once, then 2/s for 60 s; steady-spikes: 1.5/s for 90 s
with 60 tasks at once at 20 s and 60 s; tasks sleep 0.5-3 s) is published in real time to a fresh
queue, one scaler after the other in this one run, each scaling real `celery worker` processes
(concurrency 4, at most 6, prefetch 1, acks late, the same command line for all, with
`--worker-args` added for all alike):
  ours        `local` mode: the operator's pool loop, pollSeconds 5, targetWaitSeconds 10,
              workerStartupSeconds 3 (a worker here takes 2-4 s to its first task with six starting
              at once, about 1.8 s alone on a quiet machine: benchmarks/worker_startup.py);
  ours-measured  the same without workerStartupSeconds: the pool measures its workers' start-up
              itself (none until its first workers have started);
  keda-tuned  KEDA's queue-length scaler behind the HPA as simulation/baselines.py models it
              (ceil(ready messages / 4), activation, highest recommendation of the down window),
              polled every 5 s with a 60 s down window and cooldown;
  keda        the same with KEDA's and the HPA's defaults (15 s sync, 30 s activation, 300 s window);
  limit       six workers ready before the first task: no scaler waits less (the physical limit).
The publisher stamps its tasks as README asks (`instrument`), so the probe knows the oldest task's
wait; only ours reads it. Waits are the tasks' own start minus the publish time they carry;
worker-seconds are sampled the same way for all (worker processes alive, every 0.5 s, until the
trace ends plus `--tail`); a task lost is one published and never finished. Each row ends with
the 1-minute load average before and after it: the machine is shared. Targets (issue 15):
ours p95 <= 0.9x keda-tuned's on each workload; worker-seconds <= 0.6x keda-tuned's on
burst-trickle, <= 0.8x on the others; 0 lost.

`--reaction N` instead times a burst landing on a pool at zero until the scale call, N times for
ours with pollSeconds 10 (target: median <= 1.5 s) and a third as often for keda-tuned.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from celery_worker_operator import instrument
from celery_worker_operator.brokers import ProbeRegistry
from celery_worker_operator.demo.app import app, work
from celery_worker_operator.localmode import LocalRun
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.policy import Observation, QueueObservation
from celery_worker_operator.simulation.baselines import KedaScaler
from celery_worker_operator.simulation.engine import percentile
from celery_worker_operator.spec import CeleryWorkerPool
from celery_worker_operator.workloads.local import LocalWorkload

HERE = Path(__file__).resolve().parent
CONCURRENCY, MAX_REPLICAS, TARGET_WAIT = 4, 6, 10.0
SAMPLE_SECONDS = 0.5
Sends = list[tuple[float, float]]  # (seconds after the start, task duration)


def burst_trickle(rng: random.Random) -> Sends:
    burst = [(i / 240, rng.uniform(0.5, 3.0)) for i in range(240)]
    return burst + [(1 + i / 2, rng.uniform(0.5, 3.0)) for i in range(120)]


def steady_spikes(rng: random.Random) -> Sends:
    sends, now = [], 0.0
    while (now := now + rng.expovariate(1.5)) < 90:
        sends.append((now, rng.uniform(0.5, 3.0)))
    for at in (20.0, 60.0):
        sends += [(at + i / 60, rng.uniform(0.5, 3.0)) for i in range(60)]
    return sorted(sends)


WORKLOADS: dict[str, Callable[[random.Random], Sends]] = {
    "burst-trickle": burst_trickle,
    "steady-spikes": steady_spikes,
}


STARTUP_SECONDS = 3.0


def make_pool(name: str, url: str, poll_seconds: float, worker_args: list[str]) -> CeleryWorkerPool:
    return parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name},
            "spec": {
                "broker": {"url": url},
                "queues": [name],
                "worker": {
                    "app": "celery_worker_operator.demo.app:app",
                    "image": "local",
                    "concurrency": CONCURRENCY,
                    "extraArgs": worker_args,
                },
                "autoscaling": {
                    "minReplicas": 0,
                    "maxReplicas": MAX_REPLICAS,
                    "pollSeconds": poll_seconds,
                    "targetWaitSeconds": TARGET_WAIT,
                    "taskDurationSeconds": 1.75,
                    "workerStartupSeconds": STARTUP_SECONDS,
                },
            },
        }
    )


class Scaling(Protocol):
    """One scaler running its pool in the background."""

    workload: LocalWorkload
    scale_calls: list[float]  # when it first asked for more replicas than it had, each time

    def stop(self) -> None: ...


@dataclass
class Ours:
    """`local` mode: LocalRun's loop on its own thread."""

    pool: CeleryWorkerPool
    url: str
    scale_calls: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run = LocalRun(self.pool, self.url, cwd=HERE)
        self.workload = self.run.workload
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run.run, args=(self.stopping, self._seen), daemon=True)
        self.thread.start()

    def _seen(self, run: LocalRun) -> None:
        """After each pass, on the loop's thread: the scale-ups so far, from the reporter's Events."""
        self.scale_calls[:] = [at for at, _, reason, _ in run.reporter.events if reason == "ScaledUp"]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.run.close()


@dataclass
class KedaStyle:
    """KEDA's queue-length scaler as a process: the simulator's KedaScaler deciding, real workers acting."""

    pool: CeleryWorkerPool
    url: str
    scaler: KedaScaler
    scale_calls: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workload = LocalWorkload(self.pool, self.url, cwd=HERE)
        self.probes = ProbeRegistry()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        queue = self.pool.metadata.name
        while not self.stopping.is_set():
            started = time.monotonic()
            current = self.workload.observe().replicas
            depth = self.probes.probe(self.url).stats([queue])[queue].depth
            now = time.time()
            obs = Observation(now, current, (QueueObservation(queue, depth),), measured_at=now)
            wanted = self.scaler.desired(obs)
            if wanted > current:
                self.scale_calls.append(time.time())
            self.workload.scale(wanted, {})  # the ReplicaSet picks by age: no load to go by
            self.stopping.wait(max(self.scaler.poll_seconds - (time.monotonic() - started), 0.0))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.workload.close()
        self.probes.close()


@dataclass
class Limit:
    """Every allowed worker started and given time to connect before the first task."""

    pool: CeleryWorkerPool
    url: str
    scale_calls: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workload = LocalWorkload(self.pool, self.url, cwd=HERE)
        self.workload.scale(MAX_REPLICAS, {})
        time.sleep(8.0)  # a worker here consumes 2-3 s after it starts; 8 s leaves margin on a busy machine

    def stop(self) -> None:
        self.workload.close()


def measured_startup(pool: CeleryWorkerPool) -> CeleryWorkerPool:
    """The pool without workerStartupSeconds: the start-up it uses is the one it measures itself."""
    scaling = pool.spec.autoscaling.model_copy(update={"worker_startup_seconds": None})
    return pool.model_copy(update={"spec": pool.spec.model_copy(update={"autoscaling": scaling})})


SCALERS: dict[str, Callable[[CeleryWorkerPool, str], Scaling]] = {
    "ours": lambda pool, url: Ours(pool, url),
    "ours-measured": lambda pool, url: Ours(measured_startup(pool), url),
    "keda-tuned": lambda pool, url: KedaStyle(pool, url, KedaScaler.tuned(0, MAX_REPLICAS, CONCURRENCY)),
    "keda": lambda pool, url: KedaStyle(pool, url, KedaScaler(0, MAX_REPLICAS, CONCURRENCY)),
    "limit": lambda pool, url: Limit(pool, url),
}


@dataclass(frozen=True)
class Outcome:
    waits: list[float]
    worker_seconds: float
    lost: int


def publish(queue: str, sends: Sends) -> None:
    """The trace in real time; each task carries its publish time."""
    start = time.monotonic()
    with app.producer_or_acquire() as producer:
        for offset, seconds in sends:
            time.sleep(max(start + offset - time.monotonic(), 0.0))
            work.apply_async((seconds, time.time(), f"{queue}:waits"), queue=queue, producer=producer)


def sample_cost(workload: LocalWorkload, until: float) -> float:
    """Worker-seconds from counting live worker processes every SAMPLE_SECONDS until `until`."""
    total = 0.0
    while time.monotonic() < until:
        total += workload.alive() * SAMPLE_SECONDS
        time.sleep(SAMPLE_SECONDS)
    return total


@dataclass(frozen=True)
class Settings:
    """What every run of this invocation shares."""

    url: str
    tail: float
    worker_args: list[str]
    decisions: bool = False


def run_one(settings: Settings, scaler: str, sends: Sends) -> Outcome:
    queue, url = f"bench-{scaler}-{uuid.uuid4().hex[:6]}", settings.url
    client = redis.Redis.from_url(url)
    scaling = SCALERS[scaler](make_pool(queue, url, 5, settings.worker_args), url)
    try:
        time.sleep(1.0)  # the scaler's first pass, at zero
        until, started = time.monotonic() + sends[-1][0] + settings.tail, time.time()
        publisher = threading.Thread(target=publish, args=(queue, sends), daemon=True)
        publisher.start()
        cost = sample_cost(scaling.workload, until)
        publisher.join()
        deadline = time.monotonic() + 120
        while client.llen(f"{queue}:waits") < len(sends) and time.monotonic() < deadline:
            time.sleep(0.5)  # recorded when a task ends: the count of finished tasks
        waits = [float(line.split(b",")[0]) for line in client.lrange(f"{queue}:waits", 0, -1)]
        if settings.decisions and isinstance(scaling, Ours):
            for at, _, reason, message in scaling.run.reporter.events:
                print(f"  {scaler} +{at - started:6.1f} s {reason}: {message}", flush=True)
        return Outcome(waits, cost, len(sends) - len(waits))
    finally:
        scaling.stop()
        client.delete(queue, f"{queue}:waits")


def configure(url: str) -> None:
    """The publishing app on this broker, stamping what it sends (in each process that publishes)."""
    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = url
    instrument(app)


def run_isolated(settings: Settings, scaler: str, sends: Sends) -> Outcome:
    """`run_one` in a fresh process: no thread, connection or pool a previous scaler left behind
    takes CPU from this one or blocks its stop."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=configure, initargs=(settings.url,)) as pool:
        return pool.submit(run_one, settings, scaler, sends).result()


def compare(settings: Settings, names: list[str], scalers: list[str], seed: int) -> None:
    """Each row as soon as it is measured (a run takes minutes), the ratios to keda-tuned after each workload."""
    print(f"{'workload':14} {'scaler':13} {'p50':>6} {'p95':>6} {'worker-s':>9} {'lost':>4} {'load 1m':>11}")
    for name in names:
        sends = WORKLOADS[name](random.Random(seed))
        outcomes = {}
        for scaler in scalers:
            load = os.getloadavg()[0]
            outcome = outcomes[scaler] = run_isolated(settings, scaler, sends)
            p50, p95 = percentile(outcome.waits, 50), percentile(outcome.waits, 95)
            print(
                f"{name:14} {scaler:13} {p50:6.1f} {p95:6.1f} {outcome.worker_seconds:9.0f} {outcome.lost:4d} "
                f"{load:5.1f}->{os.getloadavg()[0]:<4.1f}",
                flush=True,
            )
        if "keda-tuned" in outcomes:
            tuned = outcomes["keda-tuned"]
            for scaler, outcome in outcomes.items():
                p95_ratio = percentile(outcome.waits, 95) / (percentile(tuned.waits, 95) or float("nan"))
                cost_ratio = outcome.worker_seconds / tuned.worker_seconds
                print(f"{name:14} {scaler:13} p95/tuned {p95_ratio:5.2f}  cost/tuned {cost_ratio:5.2f}", flush=True)


def reaction(settings: Settings, scaler: str, poll_seconds: float, repetitions: int) -> list[float]:
    """Seconds from a burst landing on the pool at zero to the scaler's call for workers, per repetition."""
    queue, url = f"react-{scaler}-{uuid.uuid4().hex[:6]}", settings.url
    scaling = SCALERS[scaler](make_pool(queue, url, poll_seconds, settings.worker_args), url)
    times = []
    try:
        for _ in range(repetitions):
            while scaling.workload.alive() or redis.Redis.from_url(url).llen(queue):
                time.sleep(0.2)  # back at zero, queue empty
            time.sleep(random.uniform(0, poll_seconds))  # land anywhere between two polls
            calls, sent = len(scaling.scale_calls), time.time()
            with app.producer_or_acquire() as producer:
                for _ in range(8):
                    work.apply_async((0.2, time.time(), f"{queue}:waits"), queue=queue, producer=producer)
            while len(scaling.scale_calls) == calls:
                time.sleep(0.02)
            times.append(scaling.scale_calls[calls] - sent)
            print(f"  {scaler}: scale call {times[-1]:.2f} s after the burst", flush=True)
    finally:
        scaling.stop()
        redis.Redis.from_url(url).delete(queue, f"{queue}:waits")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--tail", type=float, default=45.0, help="seconds of cost counted after the last publish")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reaction", type=int, default=0, help="time N bursts at zero instead")
    parser.add_argument("--decisions", action="store_true", help="print our scale decisions with their terms")
    parser.add_argument("--scalers", default=",".join(SCALERS), help="which scalers run, in this order")
    parser.add_argument("--worker-args", default="", help="extra `celery worker` arguments, the same for every scaler")
    args = parser.parse_args()
    settings = Settings(args.url, args.tail, args.worker_args.split(), args.decisions)
    configure(args.url)
    if args.reaction:
        ours = reaction(settings, "ours", 10.0, args.reaction)
        tuned = reaction(settings, "keda-tuned", 5.0, max(args.reaction // 3, 1))
        print(
            f"burst at zero -> scale call, median: ours {statistics.median(ours):.2f} s (pollSeconds 10, "
            f"{len(ours)} runs), keda-tuned {statistics.median(tuned):.2f} s (5 s polling, {len(tuned)} runs), "
            f"ratio {statistics.median(ours) / statistics.median(tuned):.2f}"
        )
        return
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    scalers = [n.strip() for n in args.scalers.split(",") if n.strip()]
    compare(settings, names, scalers, args.seed)


if __name__ == "__main__":
    main()
