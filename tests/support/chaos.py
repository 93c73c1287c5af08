"""The chaos suite's harness (tests/chaos): a pool under a burst on the real control plane, one fault,
and the verdict from what really happened.

- `Publisher` sends numbered `chaos.record` tasks (tests.support.chaos_app): a burst, then a steady
  stream; a number counts as published once the broker took it (a failed send is retried, as an app
  would). Each task writes its start and end, with its worker, to a ledger in the shared test Redis.
- `Recorder` samples, every half second, the Deployment's replicas, the ready pods and the pool's
  status, from the real API server (not through any proxy a scenario puts in the operator's way).
- `verdict` reads the ledger and the samples: tasks lost (published, never ended), attempts cut
  short by a scale-down (started on a pod our scale-down removed, never ended there) and those cut
  short by the fault itself (counted apart), the replicas while blind, and scale changes that
  reverse the one before (flapping) after the fault.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator.naming import member_of
from tests.support.celery_app import make_app
from tests.support.chaos_app import RECORD
from tests.support.kubelet import ProcessKubelet
from tests.support.pools import condition, read_pool

SAMPLE_SECONDS = 0.5
API_TIMEOUT = 3  # seconds per API call of the recorder: a restarting API server must not stall it


@dataclass(frozen=True)
class Attempt:
    """One run of task `number` on `worker` (a hostname); `ended` is None when it never finished."""

    number: int
    worker: str
    started: float
    ended: float | None

    @property
    def pod(self) -> str:
        return member_of(self.worker)


def read_ledger(ledger: redis.Redis, key: str) -> list[Attempt]:
    """Every attempt, oldest first: the k-th end of (number, worker) closes its k-th start."""
    ends: defaultdict[tuple[int, str], deque[float]] = defaultdict(deque)
    for number, worker, at in _entries(ledger, f"{key}:ended"):
        ends[(number, worker)].append(at)
    attempts = []
    for number, worker, at in _entries(ledger, f"{key}:started"):
        pending = ends[(number, worker)]
        attempts.append(Attempt(number, worker, at, pending.popleft() if pending else None))
    return attempts


def _entries(ledger: redis.Redis, key: str) -> list[tuple[int, str, float]]:
    rows = []
    for raw in ledger.lrange(key, 0, -1):
        number, worker, at = raw.decode().split()
        rows.append((int(number), worker, float(at)))
    return rows


class Publisher:
    """Numbered tasks for `queue`: `burst(n)` at once, `stream(rate)` in a thread until `stop()`."""

    def __init__(self, broker_url: str, queue: str, key: str, seconds: float) -> None:
        self.app = make_app(broker_url)
        # Published means the broker took it: on RabbitMQ a send waits for the broker's confirm (else a
        # send the fault cut short is written to a dying socket and counted); Redis answers each LPUSH.
        self.app.conf.broker_transport_options = {"confirm_publish": True}
        self.queue, self.key, self.seconds = queue, key, seconds
        self.published: list[tuple[int, float]] = []  # (number, when the broker took it)
        self.ids: dict[int, str] = {}  # number -> the task's id (its message's correlation_id)
        self.send_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def numbers(self) -> set[int]:
        return {number for number, _ in self.published}

    def burst(self, count: int) -> None:
        for _ in range(count):
            self._send()

    def stream(self, rate: float) -> None:
        def run() -> None:
            while not self._stop.wait(1 / rate):
                self._send()

        self._thread = threading.Thread(target=run, name=f"publish-{self.queue}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _send(self) -> None:
        number = len(self.published)
        while True:
            try:
                sent = self.app.send_task(RECORD, (self.key, number, self.seconds), queue=self.queue)
                break
            except Exception:  # the broker is down: an app retries the same task
                self.send_errors += 1
                if self._stop.wait(0.5):
                    return
        self.ids[number] = sent.id
        self.published.append((number, time.time()))

    def backlog(self, attempts: Iterable[Attempt], at: float) -> int:
        """Tasks published by `at` that no worker had started by then."""
        started = {a.number for a in attempts if a.started <= at}
        return sum(1 for number, when in self.published if when <= at and number not in started)


@dataclass(frozen=True)
class Sample:
    at: float
    replicas: int | None  # the Deployment's spec.replicas; None when the API could not be read
    ready_pods: int | None
    status: dict[str, Any] | None

    def condition(self, type_: str) -> tuple[str, str] | None:
        """(status, reason) of a condition of the pool, if it was read and has it."""
        found = condition({"status": self.status}, type_) if self.status is not None else None
        return None if found is None else (found["status"], found["reason"])


class Recorder:
    """What the control plane shows about one pool, sampled in a thread from start to stop."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self.api, self.namespace, self.name = api, namespace, name
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"record-{name}", daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.samples.append(Sample(time.time(), *self._read()))

    def _read(self) -> tuple[int | None, int | None, dict[str, Any] | None]:
        apps, core = client.AppsV1Api(self.api), client.CoreV1Api(self.api)
        try:
            found = apps.read_namespaced_deployment(
                self.name, self.namespace, _preload_content=False, _request_timeout=API_TIMEOUT
            )
            replicas = json.loads(found.data)["spec"].get("replicas", 0)
            pods = core.list_namespaced_pod(
                self.namespace,
                label_selector=f"celery-operator.dev/pool={self.name}",
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
            )
            ready = sum(1 for p in json.loads(pods.data)["items"] if _ready(p))
            status = read_pool(self.api, self.namespace, self.name).get("status", {})
        except (ApiException, OSError, ValueError, Exception):  # the API server is restarting or refusing
            return None, None, None
        return int(replicas), ready, status


def _ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


@dataclass(frozen=True)
class Fault:
    """What the test did and when: `start` and `end` are unix times, `killed` the pods it removed itself."""

    name: str
    start: float
    end: float
    killed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Need:
    """What the pool's backlog asks for, by the policy's backlog term: waiting x duration / targetWait."""

    task_seconds: float
    target_wait: float
    concurrency: int
    min_replicas: int
    max_replicas: int

    def replicas(self, backlog: int) -> int:
        slots = backlog * self.task_seconds / self.target_wait
        return min(self.max_replicas, max(self.min_replicas, math.ceil(slots / self.concurrency)))


@dataclass
class Verdict:
    """The numbers a chaos scenario is judged by; `summary()` is the line it prints."""

    fault: Fault
    published: int
    lost: list[int]
    lost_at_a_cut: list[int]  # handed to a worker in the seconds before its connection was cut (see verdict)
    redelivered: list[int]  # numbers that ran more than once (a crash or a lost ack brought them back)
    cut_by_fault: list[Attempt]  # attempts cut short by the fault the test caused
    cut_by_scale_down: list[Attempt]  # attempts cut short because our scale-down removed their pod
    held_from: int | None  # replicas when the fault began
    lowest_while_blind: int | None
    below_need: list[tuple[float, int, int]]  # (time, replicas, what the backlog needed) at each shortfall
    changes: list[tuple[float, int, int]]  # (time, from, to), every scale change seen
    reversals_after: int  # changes after the fault that reverse the change before them
    minutes_after: float
    seen: dict[str, Counter[tuple[str, str]]] = field(default_factory=dict)  # conditions seen during the fault

    def summary(self) -> str:
        moves = " ".join(f"{a}->{b}@{t - self.fault.start:+.0f}s" for t, a, b in self.changes)
        return (
            f"chaos {self.fault.name}: published {self.published}, lost {len(self.lost)}, "
            f"lost in flight at the cut {len(self.lost_at_a_cut)}, "
            f"redelivered {len(self.redelivered)}, cut by the fault {len(self.cut_by_fault)}, "
            f"cut by a scale-down {len(self.cut_by_scale_down)}, replicas {self.held_from} held at "
            f">= {self.lowest_while_blind} while blind, below need {len(self.below_need)}, "
            f"reversals after {self.reversals_after} in {self.minutes_after:.1f} min; "
            f"fault {self.fault.end - self.fault.start:.0f} s; scale changes: {moves}"
        )


def nothing_in_flight(_: bytes) -> bool:
    """For scenarios without a cut connection (or on RabbitMQ, which acknowledges): no loss is excused."""
    return False


def verdict(
    fault: Fault,
    publisher: Publisher,
    attempts: list[Attempt],
    samples: list[Sample],
    kubelet: ProcessKubelet,
    namespace: str,
    need: Need,
    in_flight_at_a_cut: Callable[[bytes], bool] = nothing_in_flight,
) -> Verdict:
    """Judge a finished scenario: blind means during the fault, flapping is counted after it.

    `in_flight_at_a_cut` tells whether bytes (a task's id) went from the broker to a worker in the
    seconds before a cut connection. kombu's Redis transport pops a message (BRPOP) before it records
    it as unacknowledged, so a message in that reply when the connection drops is gone: the
    transport's own at-most-once window, which no operator can close. Such tasks are counted apart.
    """
    ended = {a.number for a in attempts if a.ended is not None}
    unended = sorted(publisher.numbers - ended)
    at_a_cut = [n for n in unended if in_flight_at_a_cut(publisher.ids[n].encode())]
    runs = Counter(a.number for a in attempts)
    cut_by_fault, cut_by_scale_down = [], []
    for attempt in attempts:
        if attempt.ended is not None:
            continue
        removed_by_us = "SIGTERM" in kubelet.signals(attempt.pod, namespace) and attempt.pod not in fault.killed
        (cut_by_scale_down if removed_by_us else cut_by_fault).append(attempt)
    known = [s for s in samples if s.replicas is not None]
    before = [s.replicas for s in known if s.at <= fault.start]
    blind = [s.replicas for s in known if fault.start <= s.at <= fault.end]
    changes = [(b.at, a.replicas, b.replicas) for a, b in itertools.pairwise(known) if a.replicas != b.replicas]
    return Verdict(
        fault=fault,
        published=len(publisher.published),
        lost=[n for n in unended if n not in at_a_cut],
        lost_at_a_cut=at_a_cut,
        redelivered=sorted(n for n, count in runs.items() if count > 1),
        cut_by_fault=cut_by_fault,
        cut_by_scale_down=cut_by_scale_down,
        held_from=before[-1] if before else None,
        lowest_while_blind=min(blind) if blind else None,  # type: ignore[type-var]
        below_need=_shortfalls(changes, publisher, attempts, need),
        changes=changes,  # type: ignore[arg-type]
        reversals_after=_reversals(changes, fault.end),  # type: ignore[arg-type]
        minutes_after=((known[-1].at - fault.end) / 60) if known else 0.0,
    )


def _shortfalls(
    changes: list[tuple[float, int | None, int | None]], publisher: Publisher, attempts: list[Attempt], need: Need
) -> list[tuple[float, int, int]]:
    """Scale-downs to fewer replicas than the backlog of the seconds before asked for (the least of
    that backlog: the operator measured a little earlier than the sample that shows its move)."""
    found = []
    for at, old, new in changes:
        if old is None or new is None or new >= old:
            continue
        wanted = min(need.replicas(publisher.backlog(attempts, at - lag)) for lag in (0.0, 1.0, 2.0, 3.0))
        if new < wanted:
            found.append((at, new, wanted))
    return found


def _reversals(changes: list[tuple[float, int | None, int | None]], since: float) -> int:
    """Changes after `since` going the other way from the change before them (also after `since`): up
    after down, down after up. The way back from a burst is one direction; a flap is two."""
    directions = [1 if new > old else -1 for at, old, new in changes if at > since]  # type: ignore[operator]
    return sum(1 for before, after in itertools.pairwise(directions) if before != after)


def settles(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll `check` until true or `timeout` seconds pass; whether it came true."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll `check` until true; fails naming `what` after `timeout` seconds."""
    if not settles(check, timeout):
        raise AssertionError(f"{what}: not within {timeout:.0f} s")


def wait_truthful(api: client.ApiClient, namespace: str, name: str, timeout: float) -> None:
    """Until the pool's status agrees with the world; fails with what it still gets wrong."""
    deadline = time.monotonic() + timeout
    while wrong := truthful(api, namespace, name):
        if time.monotonic() > deadline:
            raise AssertionError(f"the status of {namespace}/{name} is still wrong after {timeout:.0f} s: {wrong}")
        time.sleep(0.5)


def truthful(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    """What the pool's status says that the world contradicts now (empty when it tells the truth)."""
    pool = read_pool(api, namespace, name)
    status = pool.get("status", {})
    found = client.AppsV1Api(api).read_namespaced_deployment(name, namespace, _preload_content=False)
    deployment = json.loads(found.data)
    replicas = deployment["spec"].get("replicas", 0)
    ready = deployment.get("status", {}).get("readyReplicas", 0) or 0
    wrong = []
    for type_, wanted in (("MetricsAvailable", "True"), ("Ready", "True"), ("WorkersRunning", "True")):
        got = condition(pool, type_) or {}
        if got.get("status") != wanted:
            wrong.append(f"{type_} is {got.get('status')} ({got.get('reason')}: {got.get('message')})")
    if status.get("replicas") != replicas:
        wrong.append(f"status.replicas {status.get('replicas')} but the Deployment has {replicas}")
    if status.get("readyReplicas") != ready:
        wrong.append(f"status.readyReplicas {status.get('readyReplicas')} but {ready} are ready")
    if status.get("workersOnline") != ready:
        wrong.append(f"status.workersOnline {status.get('workersOnline')} but {ready} workers run")
    if pool["metadata"].get("generation") != status.get("observedGeneration"):
        wrong.append(f"observedGeneration {status.get('observedGeneration')} of {pool['metadata'].get('generation')}")
    return wrong


def conditions_between(samples: list[Sample], start: float, end: float, type_: str) -> Counter[tuple[str, str]]:
    """How often each (status, reason) of a condition was seen between `start` and `end`."""
    seen: Counter[tuple[str, str]] = Counter()
    for sample in samples:
        if start <= sample.at <= end:
            found = sample.condition(type_)
            if found is not None:
                seen[found] += 1
    return seen
