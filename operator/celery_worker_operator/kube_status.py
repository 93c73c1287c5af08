"""What `status` reads: pools and their Events, with the credentials of the person who runs it.

A thin adapter: plain dicts as the API server returns them, for status_view.py to render. These
calls are made by a person's kubeconfig, not by the operator's ServiceAccount, so the chart's RBAC
does not grant them (tests/deploy/test_rbac.py keeps them read-only); README says what they need.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from .spec import GROUP, KIND, PLURAL, VERSION

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


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
