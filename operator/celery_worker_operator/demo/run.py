"""`celery-worker-operator demo`: the bundled pool scaled live under a burst, a steady phase and a
quiet phase, ending by itself with what it cost and how long tasks waited."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from ..localmode import LocalRun
from ..manifests import load_pools
from ..simulation.engine import percentile
from . import app as demo_app

DEMO_POOL = Path(__file__).parent / "pool.yaml"
SETTLE_TIMEOUT = 60.0  # after the load: how long the pool may take to return to its minimum


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float  # tasks per second; a burst sends `burst` at once instead
    burst: int = 0


PHASES = (
    Phase("burst", 15, 0, burst=60),
    Phase("steady", 30, 2.0),
    Phase("quiet", 10, 0),
)


@dataclass(frozen=True)
class DemoSummary:
    sent: int
    done: int
    p95_wait: float
    target_wait: float
    worker_seconds: float
    peak_replicas: int
    final_replicas: int
    min_replicas: int
    scale_events: int

    def lines(self) -> list[str]:
        verdict = "within" if self.p95_wait <= self.target_wait else "OVER"
        return [
            f"tasks done        {self.done} of {self.sent}",
            f"p95 wait          {self.p95_wait:.1f} s ({verdict} the {self.target_wait:g} s target)",
            f"worker-seconds    {self.worker_seconds:.0f} (peak {self.peak_replicas} workers, "
            f"back to {self.final_replicas}; minReplicas {self.min_replicas})",
            f"scale decisions   {self.scale_events}",
        ]


def send_load(stop: threading.Event, say: Callable[[str], None], rng: random.Random) -> int:
    """Drive the phases; returns how many tasks were sent."""
    sent = 0
    for phase in PHASES:
        say(f"phase: {phase.name}")
        end = time.monotonic() + phase.seconds
        for _ in range(phase.burst):
            demo_app.work.apply_async((rng.uniform(0.5, 1.5), time.time()))
            sent += 1
        while time.monotonic() < end and not stop.is_set():
            if phase.rate:
                demo_app.work.apply_async((rng.uniform(0.5, 1.5), time.time()))
                sent += 1
            stop.wait(1 / phase.rate if phase.rate else 0.5)
    return sent


def run_demo(broker_url: str, run_pass: Callable[[LocalRun], None], say: Callable[[str], None]) -> DemoSummary:
    """Run the bundled pool on `broker_url` until the load is done and the pool is back at its minimum."""
    pool = load_pools(DEMO_POOL)[0]
    demo_app.app.conf.broker_url = broker_url
    store = redis.Redis.from_url(broker_url, decode_responses=True)
    store.delete(demo_app.WAITS_KEY, demo_app.QUEUE)
    run = LocalRun(pool, broker_url, telemetry_window=20.0)
    stop, result = threading.Event(), {"sent": 0}
    sender = threading.Thread(target=lambda: result.update(sent=send_load(stop, say, random.Random(7))), daemon=True)
    peak = 0

    def one_pass() -> None:
        nonlocal peak
        run.step()
        run_pass(run)
        peak = max(peak, run.workload.observe().replicas)
        time.sleep(pool.spec.autoscaling.poll_seconds)

    try:
        sender.start()
        while sender.is_alive():
            one_pass()
        settle_by = time.monotonic() + SETTLE_TIMEOUT
        while not _settled(run, store, result["sent"]):
            if time.monotonic() > settle_by:
                say("the pool did not settle in time; stopping")
                break
            one_pass()
    finally:
        stop.set()
        sender.join(5)
        final = run.workload.observe().replicas
        run.close()
    waits = [float(str(item).split(",")[0]) for item in store.lrange(demo_app.WAITS_KEY, 0, -1)]
    store.delete(demo_app.WAITS_KEY)
    return DemoSummary(
        sent=result["sent"], done=len(waits), p95_wait=percentile(waits, 95),
        target_wait=pool.spec.autoscaling.target_wait_seconds, worker_seconds=run.workload.worker_seconds(),
        peak_replicas=peak, final_replicas=final, min_replicas=pool.spec.autoscaling.min_replicas,
        scale_events=run.reporter.scale_events,
    )  # fmt: skip


def _settled(run: LocalRun, store: redis.Redis, sent: int) -> bool:
    done = store.llen(demo_app.WAITS_KEY)
    return bool(done >= sent and run.workload.observe().replicas <= run.pool.spec.autoscaling.min_replicas)
