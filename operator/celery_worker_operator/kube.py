"""The pool loop's parts on Kubernetes: status and Events through the API, the worker Deployment,
broker URLs from Secrets; `Operator` holds one loop per pool and what all of them share.

The kopf handlers (handlers.py) only call into this; it knows no kopf.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .pool_loop import PoolLoop, SharedResources
from .reconciler import PoolMemory, Sources
from .secrets import broker_urls
from .spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, CeleryWorkerPool
from .workloads.kubernetes import KubernetesWorkload

COMPONENT = "celery-worker-operator"
MAX_EVENT_MESSAGE = 1024  # the API server refuses longer Event messages
PoolKey = tuple[str, str]  # (namespace, name)
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def kubernetes_client() -> client.ApiClient:
    """In-cluster credentials when running in a pod, the current kubeconfig otherwise."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


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
                sources=lambda pool: self._sources(*key, pool),
                metrics=self.shared.metrics,
                memory=PoolMemory.resume(status, time.time()),
            )
        return self.loops[key]

    def _sources(self, namespace: str, name: str, pool: CeleryWorkerPool) -> Sources:
        workload = KubernetesWorkload(self.api, pool)
        broker = broker_urls(client.CoreV1Api(self.api), pool)
        return self.shared.sources(namespace, name, broker, workload, pool.spec.broker.transport_options)

    def ensure_workload(self, pool: CeleryWorkerPool, uid: str) -> None:
        """Create or roll the managed Deployment; adopted ones are left to their owners."""
        KubernetesWorkload(self.api, pool).ensure(uid)

    def forget(self, namespace: str, name: str) -> None:
        """The pool is deleted: its Deployment goes with its owner reference; here what we remember goes."""
        loop = self.loops.pop((namespace, name), None)
        self.shared.metrics.forget(namespace, name)
        if loop is not None and loop.last_broker is not None:
            self.shared.controller.forget(loop.last_broker, name)

    def close(self) -> None:
        self.shared.close()


class PoolNotFound(LookupError):
    """No such pool, or no CeleryWorkerPool API at all (the CRD is not installed)."""


@dataclass(frozen=True)
class PoolReading:
    """A pool object and the Events about it, as the API server returns them."""

    pool: dict[str, Any]
    events: list[dict[str, Any]]


def current_namespace() -> str:
    """The namespace kubectl would use: the pod's own in a cluster, else the kubeconfig context's."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as pod_namespace:
            return pod_namespace.read().strip()
    except OSError:
        _, context = config.list_kube_config_contexts()  # type: ignore[no-untyped-call]
        return str((context or {}).get("context", {}).get("namespace") or "default")


def read_pools(api: client.ApiClient, namespace: str | None, name: str | None = None) -> list[PoolReading]:
    """One pool (`name`), a namespace's pools, or every namespace's (`namespace` None), with their Events."""
    objects = client.CustomObjectsApi(api)
    try:
        if name is not None:
            assert namespace is not None, "a pool is named within a namespace"
            response = objects.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            )
            pools = [_body(response)]
        elif namespace is not None:
            response = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _preload_content=False)
            pools = _body(response)["items"]
        else:
            response = objects.list_cluster_custom_object(GROUP, VERSION, PLURAL, _preload_content=False)
            pools = _body(response)["items"]
    except ApiException as error:
        if error.status != 404:
            raise
        what = f"CeleryWorkerPool {namespace}/{name}" if name else f"the {PLURAL}.{GROUP} API (is the CRD installed?)"
        raise PoolNotFound(f"{what} not found") from None
    events = _pool_events(api, namespace, name)
    return [PoolReading(pool, events.get(pool["metadata"]["uid"], [])) for pool in pools]


def _pool_events(api: client.ApiClient, namespace: str | None, name: str | None) -> dict[str, list[dict[str, Any]]]:
    """Events about pools, by the pool's uid (a pool deleted and made again under one name keeps none)."""
    selector = f"involvedObject.kind={KIND}" + (f",involvedObject.name={name}" if name else "")
    core = client.CoreV1Api(api)
    if namespace is None:
        response = core.list_event_for_all_namespaces(field_selector=selector, _preload_content=False)
    else:
        response = core.list_namespaced_event(namespace, field_selector=selector, _preload_content=False)
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for event in _body(response)["items"]:
        by_pool.setdefault(event["involvedObject"].get("uid", ""), []).append(event)
    return by_pool


def pool_changes(api: client.ApiClient, namespace: str | None, name: str | None = None) -> Iterator[None]:
    """Yields each time a pool in view changes (the operator writes status with every decision)."""
    objects = client.CustomObjectsApi(api)
    selector = {"field_selector": f"metadata.name={name}"} if name else {}
    while True:  # a watch ends after its timeout; start the next one where it left off
        if namespace is None:
            stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                objects.list_cluster_custom_object, GROUP, VERSION, PLURAL, **selector
            )
        else:
            stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                objects.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, **selector
            )
        for _ in stream:
            yield None


def _body(response: object) -> Any:
    """The JSON of a `_preload_content=False` answer: the objects as stored, camelCase keys and all."""
    return json.loads(cast(Any, response).data)
