"""Faults under load: the operator, the API server, the brokers and a worker pod each fail once while a
pool works off a burst on the real control plane, with real brokers and real `celery worker` pods.

Every scenario runs the same stage (tests.support.chaos): a pool of 1-4 workers x 2 slots, a burst
of 1 s tasks and a steady stream behind it, one fault once the pool has grown to its maximum, and
then the verdict from the tasks' own ledger and what the API server showed every half second:

- nothing lost: every published task ends;
- no task cut short by a scale-down (attempts the fault itself cut short are counted apart);
- while the operator is blind or cut off, replicas never drop below what they were (held), and no
  scale-down ever goes below what the backlog asks for;
- afterwards no flapping: at most one change per minute reverses the one before it;
- the pool's conditions say what happens during the fault, and tell the truth after it.

The shared RabbitMQ is never restarted: its "restart" is every connection dropped and refused for a
while by a TCP proxy in front of it, on a vhost of the test's own (all a client sees of a restart).
The shared Redis is never touched either: a private, durable one is restarted instead.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec
from celery_worker_operator.workloads.kubernetes import CONTAINER
from tests.support.api_proxy import ApiFaultProxy
from tests.support.chaos import (
    Fault,
    Need,
    Publisher,
    Recorder,
    Verdict,
    conditions_between,
    nothing_in_flight,
    read_ledger,
    settles,
    verdict,
    wait_truthful,
    wait_until,
)
from tests.support.chaos_app import LEDGER_ENV
from tests.support.kubelet import ProcessKubelet
from tests.support.operator_process import OperatorProcess, OperatorSetup, write_kubeconfig
from tests.support.pools import apply_pool, create_secret, pool_manifest
from tests.support.rabbitmq_admin import temporary_vhost
from tests.support.redis_server import PrivateRedis
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
TASK_SECONDS = 1.0
CONCURRENCY = 2
MIN_REPLICAS, MAX_REPLICAS = 1, 4
TARGET_WAIT = 5.0
AUTOSCALING = {
    "minReplicas": MIN_REPLICAS,
    "maxReplicas": MAX_REPLICAS,
    "pollSeconds": 1,
    "targetWaitSeconds": TARGET_WAIT,
    "taskDurationSeconds": TASK_SECONDS,
    "scaleDown": {"stabilizationSeconds": 6},
}
NEED = Need(TASK_SECONDS, TARGET_WAIT, CONCURRENCY, MIN_REPLICAS, MAX_REPLICAS)
BURST = 80  # 80 task-seconds: ten seconds of the full pool's 8 slots, a backlog for all four workers
STREAM_RATE = 2.0  # tasks per second behind the burst (about two workers' worth), until the fault is over
OBSERVE_AFTER = 5.0  # seconds watched at the pool's floor for a flap back up


@dataclass
class Stage:
    """One pool with its operator and its workers, ready for a burst and a fault."""

    api: client.ApiClient
    namespace: str
    name: str
    queue: str
    key: str
    kubelet: ProcessKubelet
    setup: OperatorSetup
    stack: ExitStack
    operator: OperatorProcess | None = None

    def start_operator(self) -> None:
        self.operator = self.stack.enter_context(self.setup.run())

    def kill_operator(self) -> None:
        assert self.operator is not None
        self.operator.popen.kill()
        self.operator.popen.wait(10)

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Every operator process's log tail on stderr if the block fails (the fixture never sees why)."""
        try:
            yield
        except BaseException:
            for log in sorted(self.setup.logs.glob("operator-*.log")):
                sys.stderr.write(f"--- {log} ---\n{log.read_text(errors='replace')[-6000:]}\n")
            raise

    def restart_apiserver(self) -> float:
        """Restart kube-apiserver (then the controller manager, as scripts/cluster.sh does); returns when
        the API answered again, which is when the operator could act again."""
        answering: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            down = False
            while not stop.wait(0.2):
                try:
                    client.VersionApi(self.api).get_code(_request_timeout=1)
                except Exception:  # refused, reset or timed out: it is down
                    down = True
                    continue
                if down:
                    answering.append(time.time())
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        restart = subprocess.run(["bash", "scripts/cluster.sh", "restart-apiserver"], capture_output=True, text=True,
                                 timeout=180, cwd=ROOT, check=False)  # fmt: skip
        assert restart.returncode == 0, restart.stdout + restart.stderr
        watcher.join(timeout=10)
        stop.set()
        return answering[0] if answering else time.time()

    def busy_pod(self, ledger: redis.Redis) -> str:
        """A pod running a task now, by the ledger."""
        deadline = time.monotonic() + 20
        while not (running := [a.pod for a in read_ledger(ledger, self.key) if a.ended is None]):
            assert time.monotonic() < deadline, "no task ran for 20 s"
            time.sleep(0.2)
        return running[-1]


Inject = Callable[[Stage], Fault]


@pytest.fixture
def stage(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
) -> Iterator[Stage]:
    suffix = uuid.uuid4().hex[:6]
    name, queue = f"chaos-{suffix}", f"chaos-q-{suffix}"
    with ExitStack() as stack:
        yield Stage(kube_api, kube_namespace, name, queue, f"chaos-ledger-{suffix}", kubelet, operator, stack)
    redis.Redis.from_url(redis_url).delete(queue, f"chaos-ledger-{suffix}:started", f"chaos-ledger-{suffix}:ended")
    release_pool(kube_api, kube_namespace, name)


def release_pool(api: client.ApiClient, namespace: str, name: str) -> None:
    """Drop the operator's finalizer (the operator is gone): else the namespace never finishes deleting."""
    objects = client.CustomObjectsApi(api)
    with suppress(ApiException):  # never created, or gone
        objects.patch_namespaced_custom_object(
            spec.GROUP, spec.VERSION, namespace, spec.PLURAL, name, {"metadata": {"finalizers": None}}
        )


def chaos_pool(name: str, queue: str, ledger_url: str) -> dict[str, Any]:
    manifest = pool_manifest(name, queue, **AUTOSCALING)
    worker = manifest["spec"]["worker"]
    worker.update(app="tests.support.chaos_app:app", concurrency=CONCURRENCY)
    worker["template"] = {
        "spec": {"containers": [{"name": CONTAINER, "env": [{"name": LEDGER_ENV, "value": ledger_url}]}]}
    }
    return manifest


def run_chaos(
    stage: Stage,
    *,
    broker_url: str,
    publish_url: str,
    ledger_url: str,
    inject: Inject,
    in_flight_at_a_cut: Callable[[bytes], bool] = nothing_in_flight,
) -> tuple[Verdict, Recorder]:
    """The burst, the fault `inject` causes (it returns once the fault is over), the wait for every
    task and for the pool's floor, and the verdict (`in_flight_at_a_cut`: see `verdict`). The caller
    asserts on it."""
    api, ns, name = stage.api, stage.namespace, stage.name
    ledger = redis.Redis.from_url(ledger_url)
    create_secret(api, ns, f"{name}-broker", broker_url)
    publisher = Publisher(publish_url, stage.queue, stage.key, TASK_SECONDS)
    with Recorder(api, ns, name) as recorder, stage.logs_on_failure():
        if stage.operator is None:
            stage.start_operator()
        apply_pool(api, ns, chaos_pool(name, stage.queue, ledger_url))
        wait_until("the first worker ready", lambda: _latest(recorder, "ready_pods") == 1, timeout=90)
        publisher.burst(BURST)
        publisher.stream(STREAM_RATE)
        wait_until(
            "the pool at its maximum",
            lambda: _latest(recorder, "replicas") == MAX_REPLICAS and (_latest(recorder, "ready_pods") or 0) >= 3,
            timeout=60,
        )
        try:
            fault = inject(stage)
        finally:
            publisher.stop()
        if stage.operator is not None:
            stage.operator.assert_alive()  # an operator that gives up on a fault has lost
        # Not an assertion: a task that never ends is reported by number in the verdict below.
        settles(lambda: publisher.numbers <= {a.number for a in read_ledger(ledger, stage.key) if a.ended}, 120)
        wait_until("the pool back at its floor", lambda: _latest(recorder, "replicas") == MIN_REPLICAS, timeout=90)
        time.sleep(OBSERVE_AFTER)
        wait_truthful(api, ns, name, timeout=45)
    if stage.operator is not None:
        stage.operator.assert_alive()
    attempts = read_ledger(ledger, stage.key)
    judged = verdict(fault, publisher, attempts, recorder.samples, stage.kubelet, ns, NEED, in_flight_at_a_cut)
    print(judged.summary())
    return judged, recorder


def _latest(recorder: Recorder, field: str) -> Any:
    known = [s for s in recorder.samples if s.replicas is not None]
    return getattr(known[-1], field) if known else None


def assert_survived(judged: Verdict) -> None:
    """What every scenario must show, whatever the fault."""
    assert not judged.lost, f"tasks lost: {judged.lost}"
    assert not judged.cut_by_scale_down, f"tasks cut short by a scale-down: {judged.cut_by_scale_down}"
    assert judged.held_from == MAX_REPLICAS, f"the fault began at {judged.held_from} replicas"
    assert judged.lowest_while_blind is not None and judged.lowest_while_blind >= judged.held_from, (
        f"replicas fell to {judged.lowest_while_blind} from {judged.held_from} while the operator was blind"
    )
    assert not judged.below_need, (
        f"scale-downs below what the backlog needed (time, replicas, needed): {judged.below_need}"
    )
    allowed = max(1, int(judged.minutes_after + 0.999))
    assert judged.reversals_after <= allowed, f"flapping: {judged.reversals_after} reversals; {judged.summary()}"


def assert_broker_blind_reported(recorder: Recorder, fault: Fault) -> None:
    """While the broker cannot be reached the pool says so, and says it can measure again after."""
    during = conditions_between(recorder.samples, fault.start + 5, fault.end, "MetricsAvailable")
    assert ("False", "BrokerUnavailable") in during, f"MetricsAvailable during the fault: {dict(during)}"
    assert ("True", "BrokerMeasured") not in conditions_between(
        recorder.samples, fault.start + 8, fault.end, "MetricsAvailable"
    ), "the pool claimed to measure a broker it could not reach"
    after = conditions_between(recorder.samples, fault.end, time.time(), "MetricsAvailable")
    assert ("True", "BrokerMeasured") in after, f"MetricsAvailable after the fault: {dict(after)}"


def test_operator_killed_and_restarted(stage: Stage, redis_url: str) -> None:
    def inject(stage: Stage) -> Fault:
        start = time.time()
        stage.kill_operator()
        time.sleep(5)  # away as long as a rescheduled pod takes
        stage.start_operator()
        return Fault("operator SIGKILL", start, time.time())

    judged, _ = run_chaos(stage, broker_url=redis_url, publish_url=redis_url, ledger_url=redis_url, inject=inject)
    assert_survived(judged)


def test_kube_apiserver_restarted(stage: Stage, redis_url: str) -> None:
    def inject(stage: Stage) -> Fault:
        start = time.time()
        return Fault("kube-apiserver restart", start, stage.restart_apiserver())

    judged, _ = run_chaos(stage, broker_url=redis_url, publish_url=redis_url, ledger_url=redis_url, inject=inject)
    assert_survived(judged)


def test_redis_restarted(stage: Stage, redis_url: str, tmp_path: Path) -> None:
    password = f"chaos-{uuid.uuid4().hex[:8]}"
    with PrivateRedis(tmp_path, password, durable=True) as broker:

        def inject(stage: Stage) -> Fault:
            start = time.time()
            broker.stop()  # SIGKILL: what survives is what the append-only file holds
            time.sleep(8)
            broker.start()
            return Fault("Redis restart", start, time.time())

        judged, recorder = run_chaos(stage, broker_url=broker.url, publish_url=broker.url, ledger_url=redis_url,
                                     inject=inject)  # fmt: skip
    assert_survived(judged)
    assert_broker_blind_reported(recorder, judged.fault)
    assert all(password not in str(s.status) for s in recorder.samples), "the broker's password reached the status"


def outage(proxy: TcpProxy, seconds: float, name: str) -> Inject:
    """A fault: the proxy cut for `seconds`, then restored."""

    def inject(stage: Stage) -> Fault:
        start = time.time()
        proxy.cut()
        time.sleep(seconds)
        proxy.restore()
        return Fault(name, start, time.time())

    return inject


def test_rabbitmq_restarted(stage: Stage, redis_url: str, amqp_url: str, management_url: str) -> None:
    parts = urlsplit(amqp_url)
    with (
        temporary_vhost(management_url) as vhost,
        TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672)) as proxy,
    ):
        via_proxy = urlunsplit(
            (parts.scheme, f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}", f"/{vhost}", "", "")
        )

        # every connection of every client dropped, new ones refused: all a client sees of a restart
        inject = outage(proxy, 8, "RabbitMQ restart")
        judged, recorder = run_chaos(stage, broker_url=via_proxy, publish_url=via_proxy, ledger_url=redis_url,
                                     inject=inject)  # fmt: skip
    assert_survived(judged)
    assert_broker_blind_reported(recorder, judged.fault)


def test_network_to_the_broker_cut_for_a_minute(stage: Stage, redis_url: str) -> None:
    parts = urlsplit(redis_url)
    with TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        via_proxy = urlunsplit((parts.scheme, f"127.0.0.1:{proxy.port}", parts.path, "", ""))

        inject = outage(proxy, 60, "network cut")  # the operator and workers lose the broker, the publisher not
        judged, recorder = run_chaos(stage, broker_url=via_proxy, publish_url=redis_url, ledger_url=redis_url,
                                     inject=inject, in_flight_at_a_cut=proxy.sent_just_before_a_cut)  # fmt: skip
    assert_survived(judged)
    # kombu's Redis transport loses a popped message whose reply a cut drops: at most one per worker
    assert len(judged.lost_at_a_cut) <= MAX_REPLICAS, judged.summary()
    assert_broker_blind_reported(recorder, judged.fault)


def test_worker_pod_force_deleted(stage: Stage, redis_url: str) -> None:
    ledger = redis.Redis.from_url(redis_url)

    def inject(stage: Stage) -> Fault:
        pod = stage.busy_pod(ledger)
        start = time.time()
        client.CoreV1Api(stage.api).delete_namespaced_pod(
            pod, stage.namespace, grace_period_seconds=0, body={"gracePeriodSeconds": 0}
        )
        wait_until("a replacement pod", lambda: pod not in stage.kubelet.running() and _ready_count(stage) >= 4, 60)
        return Fault("worker pod force-deleted", start, time.time(), killed=frozenset({pod}))

    judged, _ = run_chaos(stage, broker_url=redis_url, publish_url=redis_url, ledger_url=redis_url, inject=inject)
    assert_survived(judged)
    assert judged.cut_by_fault, "the force-deleted pod was running a task: its attempt must show as cut short"


def _ready_count(stage: Stage) -> int:
    pods = (
        client.CoreV1Api(stage.api)
        .list_namespaced_pod(stage.namespace, label_selector=f"celery-operator.dev/pool={stage.name}")
        .items
    )
    return sum(
        1
        for p in pods
        if not p.metadata.deletion_timestamp
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    )


@contextmanager
def api_errors_for_the_operator(stage: Stage) -> Iterator[ApiFaultProxy]:
    """The operator's kubeconfig points at an ApiFaultProxy in front of the API server."""
    cluster = stage.setup.cluster
    pki = cluster.state / "pki"
    with ApiFaultProxy(
        cluster.server, cluster.ca_file, pki / "serving" / "apiserver.crt", pki / "serving" / "apiserver.key"
    ) as proxy:
        token = _token_of(stage.setup.kubeconfig)
        proxied = write_kubeconfig(
            dataclasses.replace(cluster, server=proxy.url), token, stage.setup.logs / "proxied.kubeconfig"
        )
        stage.setup = dataclasses.replace(stage.setup, kubeconfig=proxied)
        yield proxy


def _token_of(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"])


def test_api_calls_answered_429_and_500_for_a_minute(stage: Stage, redis_url: str) -> None:
    with api_errors_for_the_operator(stage) as proxy:

        def inject(stage: Stage) -> Fault:
            start = time.time()
            proxy.fail((429, 500))
            time.sleep(60)
            proxy.heal()
            return Fault("API 429/500", start, time.time())

        judged, _ = run_chaos(stage, broker_url=redis_url, publish_url=redis_url, ledger_url=redis_url, inject=inject)
    assert_survived(judged)
    assert proxy.answered[429] and proxy.answered[500], f"the operator never met the errors: {proxy.answered}"
