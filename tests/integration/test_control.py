"""Control convergence against real `celery worker` processes on the real Redis and RabbitMQ.

What a worker has is always checked with Celery's own inspect, from a separate client app, never
from what the controller says it did. Pool and queue names are unique per test, so concurrent runs
on the shared servers never meet; queues are deleted afterwards and workers killed in finalizers.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from celery import Celery

from celery_worker_operator.control import (
    ConvergeResult,
    PoolController,
    PoolSettings,
    TimeLimits,
    WorkerSettings,
    worker_start_settings,
)
from celery_worker_operator.control.wire import TASK_INFO, worker_settings
from celery_worker_operator.naming import PoolIdentity
from tests.support.celery_app import make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.control_app import DECLARED, DECLARED_RATE, RECORD, Record, read_records
from tests.support.rabbitmq_admin import delete_queues
from tests.support.redis_cleanup import purge_queues
from tests.support.waiting import wait_for

pytestmark = pytest.mark.brokers


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_url" if request.param == "redis" else "amqp_url"))


@dataclass
class Scene:
    """One test's broker, worker processes, client app, controller, queue names and task records."""

    broker_url: str
    workers: CeleryWorkers
    client: Celery
    controller: PoolController
    log: Path
    made: list[str] = field(default_factory=list)

    def queue(self, name: str) -> str:
        """A unique queue name, removed from the broker after the test."""
        self.made.append(f"{name}-{uuid.uuid4().hex[:8]}")
        return self.made[-1]

    def start(self, hostname: str, queues: list[str], settings: dict[str, str] | None = None) -> str:
        self.workers.start(hostname, queues, settings=settings)
        self.workers.wait_ready(self.client, hostname)
        return hostname

    def converge(self, pool: PoolIdentity, desired: PoolSettings, members: tuple[str, ...] = ()) -> ConvergeResult:
        return self.controller.converge(self.broker_url, pool, desired, members)

    def seen(self, hostname: str) -> WorkerSettings:
        """What the worker itself reports now, through Celery's inspect."""

        def ask() -> tuple[object, object]:
            inspect = self.client.control.inspect(destination=[hostname], timeout=1.0, limit=1)
            return (inspect.active_queues() or {}).get(hostname), (inspect.registered(*TASK_INFO) or {}).get(hostname)

        queues, registered = wait_for(ask, lambda r: None not in r, timeout=10)
        return worker_settings(queues, registered)

    def settle(self, hostname: str, ok: Callable[[WorkerSettings], bool]) -> WorkerSettings:
        """Consumer changes land on the worker's event loop just after its reply: poll until they show."""
        return wait_for(lambda: self.seen(hostname), ok, timeout=10, interval=0.2)

    def records(self, done: Callable[[set[tuple[str, str]]], bool], timeout: float = 30) -> list[Record]:
        """The task records once `done({(event, label), ...})` holds."""
        return wait_for(lambda: read_records(self.log), lambda rows: done({r[:2] for r in rows}), timeout=timeout)

    def send(self, queue: str, label: str, seconds: float = 0.0) -> None:
        self.client.send_task(RECORD, args=(str(self.log), label, seconds), queue=queue)


@pytest.fixture
def scene(broker_url: str, tmp_path: Path) -> Iterator[Scene]:
    client = make_app(broker_url)
    # Workers answer a ping in milliseconds; each pass pings afresh, as tests start workers between passes.
    controller = PoolController(reply_timeout=0.5, discovery_max_age=0)
    with CeleryWorkers("tests.support.control_app", broker_url) as workers:
        setup = Scene(broker_url, workers, client, controller, tmp_path / "records")
        try:
            yield setup
        finally:
            controller.close()
            client.close()
            (delete_queues if broker_url.startswith("amqp") else purge_queues)(broker_url, setup.made)


def unique(prefix: str, namespace: str = "tests") -> PoolIdentity:
    """A pool of a unique name; its workers are `<name>.<namespace>@<member>` (`f"{pool}@w1"`)."""
    return PoolIdentity(namespace, f"{prefix}{uuid.uuid4().hex[:8]}")


def test_limits_and_queues_reach_one_pool_and_nothing_of_the_same_name_in_another_namespace(scene: Scene) -> None:
    ours = unique("orders", namespace="team-a")
    theirs = PoolIdentity("team-b", ours.name)
    q1, q2, other = scene.queue("a1"), scene.queue("a2"), scene.queue("b1")
    mine = scene.start(ours.hostname("w1"), [q1])
    neighbour = scene.start(theirs.hostname("w1"), [other])
    untouched = scene.seen(neighbour)
    desired = PoolSettings(frozenset({q1, q2}), {RECORD: "6/m"}, {DECLARED: TimeLimits(soft=20, hard=30)})

    result = scene.converge(ours, desired)

    assert (result.workers, result.condition[:2]) == ((mine,), ("False", "RestartPending")), result
    assert mine in result.condition.message and {worker for worker, _ in result.applied} == {mine}
    now = scene.settle(mine, lambda s: s.queues == {q1, q2})
    assert (now.rate_limits[RECORD], now.time_limits[DECLARED]) == ("6/m", TimeLimits(20.0, 30.0))
    assert scene.seen(neighbour) == untouched
    assert untouched.rate_limits == {DECLARED: DECLARED_RATE} and untouched.queues == {other}
    again = scene.converge(ours, desired)
    assert (again.applied, again.errors, again.unreachable) == ((), (), ()), "a converged pool is sent nothing"


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_worker_of_the_old_name_is_its_own_pools_until_it_rolls_and_never_the_other_namespaces(
    scene: Scene,
) -> None:
    ours = unique("orders", namespace="team-a")
    theirs = PoolIdentity("team-b", ours.name)
    queue = scene.queue("legacy")
    legacy = scene.start(f"{ours.name}@pod-1", [queue])  # as an operator before namespaced names started it
    desired = PoolSettings(frozenset({queue}), {RECORD: "6/m"})

    found = wait_for(lambda: scene.converge(ours, desired, ("pod-1",)), lambda r: r.workers == (legacy,), timeout=20)
    assert found.condition.reason == "Applied" and scene.seen(legacy).rate_limits[RECORD] == "6/m"
    other = PoolSettings(frozenset({scene.queue("b")}), {RECORD: "1/s"})
    assert scene.converge(theirs, other, members=("pod-2",)).workers == (), "not a pod of team-b's pool"
    assert scene.converge(theirs, other, members=()).workers == (), "an old name alone is nobody's"
    seen = scene.seen(legacy)
    assert (seen.rate_limits[RECORD], seen.queues) == ("6/m", {queue}), "team-b's settings never reached it"
    assert scene.controller.drain(scene.broker_url, ours, ["pod-1"], [queue], timeout=15) == []
    assert scene.settle(legacy, lambda s: not s.queues).queues == frozenset(), "drained by its old name"


def test_a_worker_started_after_convergence_gets_everything_in_one_pass(scene: Scene) -> None:
    pool, wanted, default = unique("late"), scene.queue("wanted"), scene.queue("default")
    desired = PoolSettings(frozenset({wanted}), {RECORD: "6/m"}, {RECORD: TimeLimits(hard=30)})
    scene.start(f"{pool}@w1", [default])
    assert scene.converge(pool, desired).applied
    late = scene.start(f"{pool}@w2", [default])

    result = scene.converge(pool, desired)

    assert result.workers == (f"{pool}@w1", late) and {w for w, _ in result.applied} == {late}
    assert (result.errors, result.unreachable) == ((), ())
    now = scene.settle(late, lambda s: s.queues == {wanted})
    assert (now.rate_limits[RECORD], now.time_limits[RECORD]) == ("6/m", TimeLimits(None, 30.0))


def test_a_queue_removed_from_the_spec_is_no_longer_taken(scene: Scene) -> None:
    pool, kept, dropped = unique("drop"), scene.queue("kept"), scene.queue("dropped")
    hostname = scene.start(f"{pool}@w1", [kept, dropped])
    scene.converge(pool, PoolSettings(frozenset({kept})))
    scene.settle(hostname, lambda s: s.queues == {kept})
    scene.send(dropped, "dropped")
    scene.send(kept, "kept")  # sent after: taken after, had both queues been consumed
    rows = scene.records(lambda done: ("end", "kept") in done, timeout=15)
    assert "dropped" not in {label for _, label, _ in rows}

    scene.converge(pool, PoolSettings(frozenset({kept, dropped})))  # routed again: it was waiting, not lost
    scene.records(lambda done: ("end", "dropped") in done, timeout=15)


def test_removing_limits_restores_what_the_code_declared(scene: Scene) -> None:
    pool, queue = unique("reset"), scene.queue("reset")
    hostname = scene.start(f"{pool}@w1", [queue])
    limited = PoolSettings(frozenset({queue}), {DECLARED: "6/m", RECORD: "2/s"}, {RECORD: TimeLimits(5, 10)})
    scene.converge(pool, limited)
    assert scene.seen(hostname).rate_limits == {DECLARED: "6/m", RECORD: "2/s"}

    result = scene.converge(pool, PoolSettings(frozenset({queue})))

    assert (result.errors, result.unreachable) == ((), ())
    restored = scene.seen(hostname)
    assert (restored.rate_limits, restored.time_limits) == ({DECLARED: DECLARED_RATE}, {})


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_rate_limit_of_6_per_minute_spaces_a_real_task_10_s_apart(scene: Scene) -> None:
    """The throttle is the worker's own token bucket, the same on every broker: one is enough."""
    pool, queue = unique("rate"), scene.queue("rate")
    scene.start(f"{pool}@w1", [queue])
    assert scene.converge(pool, PoolSettings(frozenset({queue}), {RECORD: "6/m"})).condition.reason == "Applied"
    sent = time.time()
    scene.send(queue, "a")
    scene.send(queue, "b")
    rows = scene.records(lambda done: {("start", "a"), ("start", "b")} <= done)
    started = {label: stamp for event, label, stamp in rows if event == "start"}
    assert started["a"] - sent < 3, "the bucket starts full: the first runs at once"
    assert 9.0 <= started["b"] - started["a"] <= 14.0, rows  # then one token every 10 s


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_hard_time_limit_kills_a_task_that_runs_too_long(scene: Scene) -> None:
    """Workers started the way the workload starts them, with the pool's time limits in their settings."""
    pool, queue = unique("hard"), scene.queue("hard")
    desired = PoolSettings(frozenset({queue}), {}, {RECORD: TimeLimits(hard=1)})
    hostname = scene.start(f"{pool}@w1", [queue], worker_start_settings(desired))  # one slot

    converged = scene.converge(pool, desired)

    assert (converged.applied, converged.condition.reason) == ((), "Applied"), "started with them: nothing to send"
    rows = long_then_next(scene, queue, seconds=60)
    started = {label: stamp for event, label, stamp in rows if event == "start"}
    assert ("end", "long") not in {r[:2] for r in rows} and started["next"] - started["long"] < 10
    assert "Hard time limit (1s) exceeded" in scene.workers.log(hostname)


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_time_limit_broadcast_to_a_running_worker_is_reported_as_pending_a_restart(scene: Scene) -> None:
    """Celery 5.6 snapshots time limits when a worker starts: the broadcast shows, but is not enforced.

    If the task below is ever killed, Celery enforces broadcasts now: RestartPending can go.
    """
    pool, queue = unique("pending"), scene.queue("pending")
    hostname = scene.start(f"{pool}@w1", [queue])
    desired = PoolSettings(frozenset({queue}), {}, {RECORD: TimeLimits(hard=1)})

    first, second = (scene.converge(pool, desired) for _ in range(2))

    assert first.applied == ((hostname, f"time_limit {RECORD} soft=none hard=1"),)
    assert second.applied == () and second.condition[:2] == first.condition[:2] == ("False", "RestartPending")
    assert hostname in second.condition.message
    assert scene.seen(hostname).time_limits[RECORD] == TimeLimits(None, 1.0)
    assert ("end", "long") in {r[:2] for r in long_then_next(scene, queue, seconds=2.5)}


def long_then_next(scene: Scene, queue: str, seconds: float) -> list[Record]:
    """Send a `seconds` task, then an instant one, to a one-slot worker; the records once "next" ended."""
    scene.send(queue, "long", seconds)
    scene.send(queue, "next")
    return scene.records(lambda done: ("end", "next") in done)


@pytest.mark.parametrize("broker_url", ["rabbitmq"], indirect=True)
def test_unknown_tasks_and_invalid_rates_are_reported_and_the_rest_applied(scene: Scene) -> None:
    pool, queue = unique("bad"), scene.queue("bad")
    hostname = scene.start(f"{pool}@w1", [queue])

    unknown = scene.converge(pool, PoolSettings(frozenset({queue}), {"app.nope": "1/s", RECORD: "6/m"}))

    assert unknown.condition[:2] == ("False", "WorkerErrors")
    assert f"{hostname}: rate_limit app.nope: unknown task" in unknown.condition.message
    assert scene.seen(hostname).rate_limits[RECORD] == "6/m"

    invalid = scene.converge(pool, PoolSettings(frozenset({queue}), {DECLARED: "6/x", RECORD: "2/s"}))

    assert invalid.condition[:2] == ("False", "InvalidLimits")
    assert "spec: rate limit '6/x' for cwo.control.declared" in invalid.condition.message
    assert scene.seen(hostname).rate_limits == {RECORD: "2/s", DECLARED: DECLARED_RATE}


@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_a_frozen_worker_is_retried_then_reported_and_converged_once_back(scene: Scene) -> None:
    pool, queue = unique("frozen"), scene.queue("frozen")
    hostname = scene.start(f"{pool}@w1", [queue])
    desired = PoolSettings(frozenset({queue}), {RECORD: "6/m"})
    controller = PoolController(reply_timeout=1.0, attempts=2, discovery_max_age=0)
    try:
        result = converge_while(controller, scene, pool, desired, during=lambda: scene.workers.pause(hostname))
        scene.workers.resume(hostname)
        assert (result.workers, result.unreachable) == ((hostname,), (hostname,)), result
        assert result.condition[:2] == ("False", "WorkersUnreachable")
        assert f"{hostname}: no reply" in result.condition.message
        assert controller.converge(scene.broker_url, pool, desired).condition.reason == "Applied"
        assert scene.seen(hostname).rate_limits[RECORD] == "6/m"
    finally:
        controller.close()


def converge_while(
    controller: PoolController, scene: Scene, pool: PoolIdentity, desired: PoolSettings, during: Callable[[], None]
) -> ConvergeResult:
    """A pass during which `during` runs once the discovery ping is answered (workers answer in ms)."""
    outcome: list[ConvergeResult] = []
    thread = threading.Thread(target=lambda: outcome.append(controller.converge(scene.broker_url, pool, desired)))
    thread.start()
    time.sleep(0.6 * controller.reply_timeout)  # inside discovery, which waits its whole timeout
    during()
    thread.join(timeout=30)
    return outcome[0]


def test_an_unreachable_broker_is_a_condition_without_the_password() -> None:
    controller = PoolController()
    try:
        started = time.monotonic()
        result = controller.converge(
            "amqp://guest:s3cret-pw@127.0.0.1:1//", PoolIdentity("ns", "p"), PoolSettings(frozenset({"q"}))
        )
    finally:
        controller.close()
    assert result.condition[:2] == ("Unknown", "BrokerUnavailable")
    assert "s3cret-pw" not in result.condition.message and "127.0.0.1:1" in result.condition.message
    assert time.monotonic() - started < 5


def test_drain_lets_a_busy_worker_finish_and_keeps_it_unsubscribed(scene: Scene) -> None:
    pool, queue = unique("drain"), scene.queue("drain")
    hostname = scene.start(f"{pool}@w1", [queue])
    scene.converge(pool, PoolSettings(frozenset({queue})))
    scene.send(queue, "long", 3.0)
    scene.records(lambda done: ("start", "long") in done)
    assert scene.controller.drain(scene.broker_url, pool, ["w1"], [queue], timeout=15) == []
    assert ("end", "long") in {r[:2] for r in read_records(scene.log)}, "drain returned before the task ended"
    assert scene.settle(hostname, lambda s: not s.queues).queues == frozenset()
    scene.converge(pool, PoolSettings(frozenset({queue})))  # a later pass must not subscribe it again
    assert scene.seen(hostname).queues == frozenset()


def test_background_convergence_reports_each_finished_pass_once(scene: Scene) -> None:
    pool, queue = unique("bg"), scene.queue("bg")
    hostname = scene.start(f"{pool}@w1", [queue])
    desired = PoolSettings(frozenset({queue}), {RECORD: "30/m"})
    assert scene.controller.converge_in_background(scene.broker_url, pool, desired) == (None, False)

    def latest() -> tuple[ConvergeResult | None, bool]:
        return scene.controller.converge_in_background(scene.broker_url, pool, desired)

    result, fresh = wait_for(latest, lambda r: r[0] is not None, timeout=20)
    assert fresh and result is not None and result.workers == (hostname,)
    assert latest() == (result, False), "a finished pass is reported once (the next one waits a full ping)"
    assert scene.settle(hostname, lambda s: s.rate_limits.get(RECORD) == "30/m")
