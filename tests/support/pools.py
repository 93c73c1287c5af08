"""CeleryWorkerPools and what the operator writes about them, read from the real API server."""

from __future__ import annotations

import base64
import json
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec

LEDGER_APP = "tests.support.local_app:app"  # records each task's start and end by number in Redis


def pool_manifest(name: str, queue: str, **autoscaling: Any) -> dict[str, Any]:
    """A managed pool whose broker URL comes from the Secret `<name>-broker`, running the ledger app."""
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": name},
        "spec": {
            "broker": {"urlFrom": {"secretKeyRef": {"name": f"{name}-broker", "key": "url"}}},
            "queues": [queue],
            "worker": {"app": LEDGER_APP, "image": "registry.example/app:1", "concurrency": 2},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 6, "pollSeconds": 1, "targetWaitSeconds": 5,
                            "taskDurationSeconds": 1, **autoscaling},
        },
    }  # fmt: skip


def create_secret(api: client.ApiClient, namespace: str, name: str, url: str) -> None:
    body = {"metadata": {"name": name}, "data": {"url": base64.b64encode(url.encode()).decode()}}
    client.CoreV1Api(api).create_namespaced_secret(namespace, body)


def apply_pool(api: client.ApiClient, namespace: str, manifest: dict[str, Any]) -> None:
    """Create the pool, or replace its spec when it exists (as `kubectl apply` would)."""
    objects = client.CustomObjectsApi(api)
    name = manifest["metadata"]["name"]
    try:
        objects.create_namespaced_custom_object(spec.GROUP, spec.VERSION, namespace, spec.PLURAL, manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        patch = {"spec": manifest["spec"]}
        objects.patch_namespaced_custom_object(spec.GROUP, spec.VERSION, namespace, spec.PLURAL, name, patch)


def read_pool(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    response = client.CustomObjectsApi(api).get_namespaced_custom_object(
        spec.GROUP, spec.VERSION, namespace, spec.PLURAL, name, _preload_content=False
    )
    return dict(json.loads(response.data))


def condition(pool: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in pool.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def events_for(api: client.ApiClient, namespace: str, name: str, reason: str | None = None) -> list[dict[str, Any]]:
    """Events about the pool `name`, oldest first, optionally of one reason."""
    response = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}", _preload_content=False
    )
    events = [e for e in json.loads(response.data)["items"] if e["involvedObject"].get("kind") == spec.KIND]
    return [e for e in events if reason is None or e["reason"] == reason]


def deployment(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        response = client.AppsV1Api(api).read_namespaced_deployment(name, namespace, _preload_content=False)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return dict(json.loads(response.data))


def replicas(api: client.ApiClient, namespace: str, name: str) -> int | None:
    found = deployment(api, namespace, name)
    return None if found is None else int(found["spec"].get("replicas", 0))


def pods_of(api: client.ApiClient, namespace: str, pool: str) -> list[dict[str, Any]]:
    response = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"celery-operator.dev/pool={pool}", _preload_content=False
    )
    return list(json.loads(response.data)["items"])
