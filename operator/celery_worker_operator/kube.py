"""The pool loop's parts on Kubernetes: status and Events through the API, the worker Deployment,
broker URLs from Secrets; `Operator` holds one loop per pool and what all of them share.

The kopf handlers (handlers.py) only call into this; it knows no kopf.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config

from .pool_loop import LoopThreads, PoolLoop, SharedResources
from .reconciler import PoolMemory, Sources
from .secrets import PemFiles, SecretCache, broker_urls
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, CeleryWorkerPool
from .template_policy import TemplatePolicy
from .workloads import FieldConflict
from .workloads.kubernetes import DeploymentViews, KubernetesWorkload

COMPONENT = "celery-worker-operator"
MAX_EVENT_MESSAGE = 1024  # the API server refuses longer Event messages
# Threads that run the pools' passes and between-poll checks, shared by all pools (waiting holds none).
# Idle pools need few: 500 pools at pollSeconds 10 are 50 passes a second, milliseconds each, and one
# check of all pools per broker a second. The bound is for passes that block: a drain (`scaleDown.mode:
# drain`) waits up to 60 s, a broker or API server that stops answering holds a call until its
# timeout; each holds one thread, and 32 let that many pools block at once while the others' passes go on. Threads start
# only as concurrent passes need them (~0.16 MB each).
PASS_THREADS = 32
# Kept connections to the API server: one per pass thread (a call that finds none idle opens, TLS
# handshake, and then drops one); the client's default keeps 5 per core.
API_CONNECTIONS = PASS_THREADS
PoolKey = tuple[str, str]  # (namespace, name)


def kubernetes_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, the current kubeconfig otherwise; API_CONNECTIONS kept."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = API_CONNECTIONS
    return client.ApiClient(configuration)


@dataclass
class KubernetesReporter:
    """Status goes to the status subresource (a merge patch that also clears vanished fields);
    Events go to the pool's namespace, attached to the pool, as `kubectl describe cwp` shows them."""

    api: client.ApiClient
    namespace: str
    name: str
    uid: str
    last: dict[str, Any] = field(default_factory=dict)

    def status(self, status: dict[str, Any]) -> None:
        patch = {**dict.fromkeys(self.last), **status}  # None deletes what is gone in a merge patch
        client.CustomObjectsApi(self.api).patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": patch}
        )
        self.last = status

    def event(self, type_: str, reason: str, message: str) -> None:
        now = datetime.now(UTC)
        body: Any = {  # the client takes plain dicts as bodies
            "metadata": {"generateName": f"{self.name}.", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:MAX_EVENT_MESSAGE],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        client.CoreV1Api(self.api).create_namespaced_event(self.namespace, body)


@dataclass
class Operator:
    """Everything the handlers share (kopf's `memo`): the API client, the per-broker resources and
    one loop per pool, kept across daemon restarts so the pool's windows survive them."""

    api: client.ApiClient
    shared: SharedResources = field(default_factory=SharedResources)
    loops: dict[PoolKey, PoolLoop] = field(default_factory=dict)
    pem_files: PemFiles = field(default_factory=PemFiles)  # the CA, certificates and keys of TLS brokers
    template_policy: TemplatePolicy = field(default_factory=TemplatePolicy)  # what worker.template may set
    deployments: DeploymentViews = field(default_factory=dict)  # the watched Deployments (kopf's index)
    threads: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(PASS_THREADS, thread_name_prefix="pool-pass")
    )  # every pool's passes and checks

    def __post_init__(self) -> None:
        self.secrets = SecretCache(client.CoreV1Api(self.api))  # broker Secrets, shared by the pools naming them
        self.loop_threads = LoopThreads(self.threads)

    def loop(self, body: Mapping[str, Any]) -> PoolLoop:
        """The pool's loop; a new one resumes from the status the pool carries."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if key not in self.loops:
            status = dict(body.get("status") or {})
            self.loops[key] = PoolLoop(
                namespace=key[0],
                name=key[1],
                reporter=KubernetesReporter(self.api, key[0], key[1], meta["uid"], status),
                sources=lambda pool: self._sources(*key, meta["uid"], pool),
                metrics=self.shared.metrics,
                memory=PoolMemory.resume(status, time.time()),
                template_policy=self.template_policy,
            )
        return self.loops[key]

    def _sources(self, namespace: str, name: str, uid: str, pool: CeleryWorkerPool) -> Sources:
        workload = KubernetesWorkload(self.api, pool, self.deployments, owner_uid=uid)
        broker = broker_urls(self.secrets, pool, self.pem_files)
        return self.shared.sources(namespace, name, broker, workload, pool.spec.broker.transport_options)

    def ensure_workload(self, pool: CeleryWorkerPool, body: Mapping[str, Any]) -> None:
        """Apply the managed Deployment (adopted ones are left to their owners); a field another
        manager applies is reported on the pool (`WorkloadApplied`), not retried in a loop."""
        if pool.spec.worker is None:
            return
        conflict = None
        try:
            KubernetesWorkload(self.api, pool).ensure(body["metadata"]["uid"])
        except FieldConflict as refused:
            conflict = str(refused)
        self.loop(body).reconciler.applied(conflict, body["metadata"].get("generation"))

    def forget(self, namespace: str, name: str) -> None:
        """The pool is deleted: its Deployment goes with its owner reference; here what we remember goes."""
        self.loops.pop((namespace, name), None)
        self.shared.release(namespace, name)

    def close(self) -> None:
        self.threads.shutdown(wait=False)
        self.shared.close()
        self.pem_files.close()
