"""kopf adapters, a few lines each: they parse, look up the shared clients, and hand over.

`registry` holds every handler, so `celery-worker-operator run` and the tests start the same
operator. Shared per process (in kopf's `memo`): the Kubernetes client, one broker probe and one
event monitor per broker URL, the limits controller, and each pool's memory between passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client, config

from .brokers import ProbeRegistry
from .control import ConvergeResult, PoolController
from .manifests import InvalidPool, parse_pool
from .metrics import PoolMetrics, TimedProbe
from .reconciler import PoolMemory, Reconciler, controller_hooks, report_blocked
from .secrets import SecretMissing, broker_urls
from .spec import GROUP, PLURAL, VERSION, CeleryWorkerPool
from .telemetry import TelemetryMonitors
from .workloads.kubernetes import KubernetesWorkload

PREFIX = "celery-operator.dev"
INVALID_SPEC_RETRY_SECONDS = 30
registry = kopf.OperatorRegistry()


def kubernetes_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, the current kubeconfig otherwise."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


@dataclass
class OperatorState:
    """What every handler shares; kopf passes it as `memo`."""

    api: client.ApiClient
    probes: ProbeRegistry = field(default_factory=ProbeRegistry)
    telemetry: TelemetryMonitors = field(default_factory=TelemetryMonitors)
    controller: PoolController = field(default_factory=PoolController)
    metrics: PoolMetrics = field(default_factory=PoolMetrics)
    memories: dict[tuple[str, str], PoolMemory] = field(default_factory=dict)

    def close(self) -> None:
        self.telemetry.stop()
        self.controller.close()
        self.probes.close()


@dataclass
class KubernetesReporter:
    """Status goes to the status subresource (a merge patch that also clears vanished fields);
    Events go through kopf, attached to the pool."""

    api: client.ApiClient
    body: Mapping[str, Any]
    last: dict[str, Any] = field(default_factory=dict)

    def status(self, status: dict[str, Any]) -> None:
        patch = {**dict.fromkeys(self.last), **status}  # None deletes what is gone in a merge patch
        meta = self.body["metadata"]
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": patch}
        )
        self.last = status

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)  # type: ignore[arg-type]


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own annotation and finalizer names; kopf's log lines are not turned into Events."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300


@kopf.on.cleanup(registry=registry)
def release(memo: OperatorState, **_: Any) -> None:
    memo.close()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster or kubeconfig credentials; none (not an error) lets another login handler answer."""
    try:
        return kopf.login_via_client(**kwargs)
    except kopf.LoginError:
        return None


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
def ensure_workload(body: kopf.Body, memo: OperatorState, **_: Any) -> None:
    """Create or roll the managed Deployment; adopted ones are left to their owners."""
    pool = _parse(body)
    KubernetesWorkload(memo.api, pool).ensure(body["metadata"]["uid"])


@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10, backoff=10)
def pool_loop(stopped: kopf.DaemonStopped, body: kopf.Body, memo: OperatorState, **_: Any) -> None:
    """Every pollSeconds, one reconciler pass; `body` is kopf's live view, so spec edits apply."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    memory = memo.memories.setdefault(key, PoolMemory.resume(body.get("status"), time.time()))
    reporter = KubernetesReporter(memo.api, body, dict(body.get("status") or {}))
    while not stopped:
        try:
            pool = parse_pool(dict(body))
        except InvalidPool as invalid:  # past the schema (an old CRD, a webhook-less edit): say so, wait for a fix
            generation = body.get("metadata", {}).get("generation")
            report_blocked(memory, reporter, "InvalidSpec", str(invalid), generation, time.time())
            stopped.wait(INVALID_SPEC_RETRY_SECONDS)
            continue
        one_pass(pool, memo, memory, reporter, body.get("metadata", {}).get("generation"))
        stopped.wait(pool.spec.autoscaling.poll_seconds)


def one_pass(
    pool: CeleryWorkerPool, memo: OperatorState, memory: PoolMemory, reporter: KubernetesReporter, generation: Any
) -> None:
    workload = KubernetesWorkload(memo.api, pool)
    try:
        url, management = broker_urls(client.CoreV1Api(memo.api), pool)
    except SecretMissing as missing:
        report_blocked(memory, reporter, "SecretMissing", str(missing), generation, time.time())
        return

    probe = memo.probes.probe(url, management)
    telemetry = memo.telemetry.monitor(url)
    namespace, name = pool.metadata.namespace, pool.metadata.name

    def count_errors(pool: CeleryWorkerPool, result: ConvergeResult) -> None:
        if result.errors:
            memo.metrics.record_broadcast_error(namespace, name, len(result.errors))

    limits, drain = controller_hooks(memo.controller, url, count_errors)
    timed = TimedProbe(probe, memo.metrics, url)
    reconciler = Reconciler(timed, telemetry, workload, reporter, memory, limits=limits, drain=drain)
    decision = reconciler.reconcile(pool, generation)
    busy = reconciler.measured.telemetry.busy_slots if reconciler.measured and reconciler.measured.telemetry else None
    memo.metrics.record_pass(namespace, name, memory.last_status or {}, decision, busy_slots=busy)


@kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, optional=True)
def forget(body: kopf.Body, memo: OperatorState, **_: Any) -> None:
    """The Deployment goes with its owner reference; here only what we remember goes."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    memo.memories.pop(key, None)
    memo.metrics.forget(*key)
    broker = body.get("spec", {}).get("broker", {})
    if broker.get("url"):
        memo.controller.forget(broker["url"], key[1])


def _parse(body: kopf.Body) -> CeleryWorkerPool:
    try:
        return parse_pool(dict(body))
    except InvalidPool as invalid:
        raise kopf.PermanentError(str(invalid)) from None
