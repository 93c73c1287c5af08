"""The pool loop as a coroutine: pools waiting between passes hold no thread each, a burst still
starts a pass within about a second, a loop cancelled during a pass (kopf cancels a daemon that
outlives its stop) ends only after that pass, and a broker that stops answering holds no more than
its share of the pass threads."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from celery_worker_operator.metrics import PoolMetrics
from celery_worker_operator.policy import WAKE_CHECK_SECONDS
from celery_worker_operator.pool_loop import LoopThreads, PoolLoop
from celery_worker_operator.reconciler import Sources
from celery_worker_operator.workloads import WorkloadState
from tests.unit.test_modes import pool
from tests.unit.test_reconciler import FakeProbe, FakeReporter, FakeTelemetry, FakeWorkload

POOLS = 40
PASS_THREADS = 2
POLL_SECONDS = 30  # far longer than the test: only the between-poll check can start the second pass


class AsyncStopping:
    """What kopf gives an async daemon as `stopped`: `await stopped.wait(timeout)` ends early when set."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)


async def until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout} s"
        await asyncio.sleep(0.05)


def loop_over(workload: FakeWorkload, probe: FakeProbe, reporter: FakeReporter, name: str = "p") -> PoolLoop:
    return PoolLoop("default", name, reporter, lambda _: Sources(probe, FakeTelemetry(), workload), PoolMetrics())


def test_pools_waiting_between_passes_hold_no_thread_and_a_burst_still_starts_a_pass() -> None:
    probe = FakeProbe(depth=0)
    workloads = [FakeWorkload(replicas=1) for _ in range(POOLS)]
    loops = [loop_over(w, probe, FakeReporter(), f"p{i}") for i, w in enumerate(workloads)]

    async def scenario() -> tuple[int, float]:
        stopping, threads = AsyncStopping(), ThreadPoolExecutor(PASS_THREADS)
        before = threading.active_count()
        spec = pool(pollSeconds=POLL_SECONDS)
        shared = LoopThreads(threads)
        runs = [asyncio.create_task(loop.run(stopping, lambda: spec, shared)) for loop in loops]
        await until(lambda: all(loop.wake is not None for loop in loops), timeout=20)  # all passed, all waiting
        await asyncio.sleep(2 * WAKE_CHECK_SECONDS)  # a couple of between-poll checks each
        added = threading.active_count() - before
        probe.depth = 300
        landed = time.monotonic()
        await until(lambda: all(w.scaled for w in workloads), timeout=20)
        took = time.monotonic() - landed
        stopping.event.set()
        await asyncio.wait_for(asyncio.gather(*runs), timeout=10)
        threads.shutdown()
        return added, took

    added, took = asyncio.run(scenario())
    assert added <= PASS_THREADS, f"{POOLS} waiting pools started {added} threads"
    assert took < 10, f"the burst waited {took:.1f} s for passes (pollSeconds {POLL_SECONDS})"
    assert all(w.replicas > 1 for w in workloads)


class GatedWorkload(FakeWorkload):
    """Its pass blocks in `observe` until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(replicas=1)
        self.entered, self.gate = threading.Event(), threading.Event()

    def observe(self) -> WorkloadState:
        self.entered.set()
        self.gate.wait(10)
        return super().observe()


def test_a_loop_cancelled_during_a_pass_ends_after_the_pass() -> None:
    workload, reporter = GatedWorkload(), FakeReporter()
    loop = loop_over(workload, FakeProbe(), reporter)

    async def scenario() -> bool:
        run = asyncio.create_task(loop.run(AsyncStopping(), pool, LoopThreads()))
        await asyncio.to_thread(workload.entered.wait, 5)
        run.cancel()
        await asyncio.sleep(0.3)
        waited = not run.done()
        workload.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await run
        return waited

    assert asyncio.run(scenario()), "the cancelled loop ended while its pass still ran"
    assert len(reporter.statuses) == 1, "the pass under way finished and reported"


def test_passes_a_silent_broker_holds_take_no_more_than_their_share_of_threads() -> None:
    gate, entered = threading.Event(), []
    silent = [GatedWorkload() for _ in range(5)]
    for workload in silent:
        workload.gate, workload.entered = gate, threading.Event()
    loops = [loop_over(w, FakeProbe(), FakeReporter(), f"silent{i}") for i, w in enumerate(silent)]
    for loop in loops:
        loop.broker = "redis://silent/0"  # as after a first pass on it
    answering = FakeReporter()
    loops.append(loop_over(FakeWorkload(replicas=1), FakeProbe(), answering, "answering"))

    async def scenario() -> None:
        stopping, threads = AsyncStopping(), ThreadPoolExecutor(3)
        shared = LoopThreads(threads, per_broker=2)
        runs = [asyncio.create_task(loop.run(stopping, pool, shared)) for loop in loops]
        await until(lambda: bool(answering.statuses), timeout=10)
        entered.extend(w for w in silent if w.entered.is_set())
        stopping.event.set()
        gate.set()
        await asyncio.wait_for(asyncio.gather(*runs), timeout=10)
        threads.shutdown()

    asyncio.run(scenario())
    assert len(entered) == 2, "the silent broker's passes under way at once"


def test_a_body_is_parsed_again_only_when_its_resource_version_moves() -> None:
    loop = loop_over(FakeWorkload(replicas=1), FakeProbe(), FakeReporter())
    body = {
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "CeleryWorkerPool",
        "metadata": {"name": "p", "namespace": "default", "resourceVersion": "1"},
        "spec": {
            "broker": {"url": "redis://r/0"},
            "queues": ["q"],
            "worker": {"app": "a", "image": "i", "concurrency": 2},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 10, "pollSeconds": 30},
        },
    }
    loop.step(body)
    body["spec"]["autoscaling"]["pollSeconds"] = 20  # the API server would have moved the version
    loop.step(body)
    assert loop.interval == 30, "the same version is the pool parsed before"
    body["metadata"]["resourceVersion"] = "2"
    loop.step(body)
    assert loop.interval == 20
