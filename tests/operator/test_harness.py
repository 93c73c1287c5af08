"""The kopf + kmock harness (tests/support/k8s.py) works: the client, kopf handlers, timers, Events.

These tests use tiny kopf handlers of their own on a registry local to each test, not the
operator's handlers, so they prove the harness alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import kopf
import pytest
from kubernetes import client, watch

from tests.support.k8s import (
    GROUP,
    KIND,
    PLURAL,
    POOLS,
    VERSION,
    Emulator,
    apply_pool,
    events_for,
    pods_labelled,
    read_pool,
    running_operator,
    wait_for,
)

pytest_plugins = ["tests.support.k8s"]

pytestmark = pytest.mark.timeout(30)

NS = "default"
LAST_HANDLED = "kopf.zalando.org/last-handled-configuration"


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("annotations") or {})


def pool_manifest(name: str = "emails") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": NS, "labels": {"team": "mail"}},
        "spec": {"replicas": 1, "queues": ["emails"]},
    }


def deployment(name: str, replicas: int = 1) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, namespace=NS, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="worker", image="celery:5")]),
            ),
        ),
    )


def pod(name: str, labels: dict[str, str]) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace=NS, labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="worker", image="celery:5")]),
    )


# ------------------------------------------------------------------ (a) the kubernetes client


def test_client_crud_on_builtins_and_pools(k8s_api: client.ApiClient, k8s_emulator: Emulator) -> None:
    core, apps, custom = client.CoreV1Api(k8s_api), client.AppsV1Api(k8s_api), client.CustomObjectsApi(k8s_api)

    core.create_namespaced_secret(
        NS, client.V1Secret(metadata=client.V1ObjectMeta(name="broker"), string_data={"url": "redis://r:6379/0"})
    )
    assert core.read_namespaced_secret("broker", NS).string_data == {"url": "redis://r:6379/0"}

    created = apps.create_namespaced_deployment(NS, deployment("emails-workers", replicas=2))
    assert created.metadata.uid and created.metadata.resource_version and created.metadata.generation == 1
    assert apps.read_namespaced_deployment("emails-workers", NS).spec.replicas == 2

    pool = apply_pool(k8s_api, pool_manifest())
    assert pool["metadata"]["namespace"] == NS and pool["metadata"]["uid"]
    assert read_pool(k8s_api, "emails")["spec"]["queues"] == ["emails"]
    with pytest.raises(client.ApiException) as conflict:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, pool_manifest())
    assert conflict.value.status == 409

    # /status of the pool: only status changes, and the rest of the object is kept.
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "emails", {"status": {"replicas": 3, "depth": 42}, "spec": {"replicas": 99}}
    )
    stored = read_pool(k8s_api, "emails")
    assert stored["status"] == {"replicas": 3, "depth": 42}
    assert stored["spec"] == {"replicas": 1, "queues": ["emails"]}  # a /status write cannot touch spec
    # ... and the main endpoint cannot touch status (the CRD has a status subresource).
    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "emails", {"status": {"depth": 0}})
    assert read_pool(k8s_api, "emails")["status"]["depth"] == 42

    # /scale of the Deployment: an autoscaling/v1 Scale in and out; the Deployment follows.
    scale = apps.patch_namespaced_deployment_scale("emails-workers", NS, {"spec": {"replicas": 5}})
    assert (scale.kind, scale.spec.replicas, scale.status.selector) == ("Scale", 5, "app=emails-workers")
    after = apps.read_namespaced_deployment("emails-workers", NS)
    assert after.spec.replicas == 5 and after.metadata.generation == 2
    assert after.spec.template.spec.containers[0].image == "celery:5"
    assert apps.read_namespaced_deployment_scale("emails-workers", NS).spec.replicas == 5

    # /scale of the pool, by the CRD's specReplicasPath / statusReplicasPath.
    pool_scale = custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "emails")
    assert pool_scale["kind"] == "Scale" and pool_scale["spec"]["replicas"] == 1
    assert pool_scale["status"]["replicas"] == 3
    custom.patch_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "emails", {"spec": {"replicas": 4}})
    assert read_pool(k8s_api, "emails")["spec"]["replicas"] == 4

    # Pods: a label selector is honoured by the server, and filtering in Python agrees.
    for name, labels in [("a-1", {"pool": "emails"}), ("a-2", {"pool": "emails"}), ("b-1", {"pool": "reports"})]:
        core.create_namespaced_pod(NS, pod(name, labels))
    everything = core.list_namespaced_pod(NS).items
    in_python = sorted(p.metadata.name for p in everything if (p.metadata.labels or {}).get("pool") == "emails")
    assert in_python == ["a-1", "a-2"] and len(everything) == 3
    assert sorted(p.metadata.name for p in pods_labelled(k8s_api, NS, {"pool": "emails"})) == in_python
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="pool notin (emails)").items] == [
        "b-1"
    ]

    # The emulator's own view agrees with the API.
    assert {o["metadata"]["name"] for o in k8s_emulator.objects(POOLS)} == {"emails"}


def test_patch_flavours_and_optimistic_concurrency(k8s_api: client.ApiClient) -> None:
    apps = client.AppsV1Api(k8s_api)
    apps.create_namespaced_deployment(NS, deployment("w"))

    # strategic-merge-patch (the client's default for built-ins) is applied as a merge patch:
    # maps merge, `null` deletes, and lists are replaced whole.
    apps.patch_namespaced_deployment("w", NS, {"metadata": {"annotations": {"a": "1", "b": "2"}}})
    apps.patch_namespaced_deployment("w", NS, {"metadata": {"annotations": {"a": None}}})
    assert apps.read_namespaced_deployment("w", NS).metadata.annotations == {"b": "2"}

    # json-patch, with a `test` on resourceVersion as kopf sends it: a stale one is a 422.
    current = apps.read_namespaced_deployment("w", NS).metadata.resource_version
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": current},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    apps.patch_namespaced_deployment("w", NS, ops)
    assert apps.read_namespaced_deployment("w", NS).metadata.finalizers == ["x/y"]
    with pytest.raises(client.ApiException) as stale:
        apps.patch_namespaced_deployment("w", NS, ops)
    assert stale.value.status == 422

    # Custom objects: merge-patch; a list of ops only with the json-patch Content-Type, as in a cluster.
    custom = client.CustomObjectsApi(k8s_api)
    apply_pool(k8s_api, pool_manifest())
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 3}]
    with pytest.raises(client.ApiException) as wrong_type:
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "emails", ops)
    assert wrong_type.value.status == 400
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "emails", ops, _content_type="application/json-patch+json"
    )
    assert read_pool(k8s_api, "emails")["spec"]["replicas"] == 3
    with pytest.raises(client.ApiException) as strategic:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "emails", {"spec": {}}, _content_type="application/strategic-merge-patch+json"
        )
    assert strategic.value.status == 415

    # replace (PUT) with a stale resourceVersion is a 409; with the current one it replaces.
    body = apps.read_namespaced_deployment("w", NS)
    body.spec.replicas = 7
    apps.replace_namespaced_deployment("w", NS, body)
    assert apps.read_namespaced_deployment("w", NS).spec.replicas == 7
    with pytest.raises(client.ApiException) as conflict:
        apps.replace_namespaced_deployment("w", NS, body)
    assert conflict.value.status == 409


def test_watch_streams_changes_made_through_the_api(k8s_api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(k8s_api)
    apply_pool(k8s_api, pool_manifest("old"))  # exists before the watch: replayed as ADDED
    stream = watch.Watch()
    seen: list[tuple[str, str, Any]] = []
    watching = threading.Event()

    def consume() -> None:
        for event in stream.stream(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL, timeout_seconds=5):
            obj = event["object"]
            seen.append((event["type"], obj["metadata"]["name"], obj.get("status", {}).get("replicas")))
            watching.set()
            if event["type"] == "DELETED":
                stream.stop()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert watching.wait(5)
    apply_pool(k8s_api, pool_manifest("new"))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "new", {"status": {"replicas": 2}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "new")
    consumer.join(5)
    assert not consumer.is_alive()
    assert seen == [("ADDED", "old", None), ("ADDED", "new", None), ("MODIFIED", "new", 2), ("DELETED", "new", 2)]


def test_watch_ends_at_its_timeout_seconds(k8s_api: client.ApiClient) -> None:
    started = time.monotonic()
    events = list(watch.Watch().stream(client.CoreV1Api(k8s_api).list_namespaced_pod, NS, timeout_seconds=1))
    assert events == [] and 0.9 < time.monotonic() - started < 3


# ------------------------------------------------------------------ (b) kopf handlers, (d) Events


async def test_kopf_create_handler_patches_status_and_posts_an_event(
    k8s_emulator: Emulator, k8s_api: client.ApiClient
) -> None:
    registry = kopf.OperatorRegistry()
    calls: list[str] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    async def created(name: str, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        calls.append(name)
        # Blocking client calls in an async handler do not deadlock: the emulator has its own thread.
        client.AppsV1Api(k8s_api).create_namespaced_deployment(NS, deployment(f"{name}-workers"))
        patch.status["observedQueues"] = list(spec["queues"])
        kopf.event(body, type="Normal", reason="Sized", message=f"{name}: 1 replica")

    async with running_operator(k8s_emulator, registry) as operator:
        apply_pool(k8s_api, pool_manifest("emails"))
        pool = await wait_for(
            lambda: read_pool(k8s_api, "emails"), lambda p: "observedQueues" in p.get("status", {}), timeout=5
        )
        assert pool["status"]["observedQueues"] == ["emails"]
        events = await wait_for(lambda: events_for(k8s_api, "emails", kind=KIND), timeout=5)
        assert operator.running

    assert calls == ["emails"]  # once: kopf's own bookkeeping patches did not re-trigger it
    assert client.AppsV1Api(k8s_api).read_namespaced_deployment("emails-workers", NS).spec.replicas == 1
    assert [(e["type"], e["reason"], e["message"]) for e in events] == [("Normal", "Sized", "emails: 1 replica")]
    assert events[0]["involvedObject"]["uid"] == pool["metadata"]["uid"]
    # kopf stored its bookkeeping on the object, which it could only do through working patches.
    assert LAST_HANDLED in annotations(pool)


async def test_kopf_update_and_delete_handlers_see_api_changes(
    k8s_emulator: Emulator, k8s_api: client.ApiClient
) -> None:
    registry = kopf.OperatorRegistry()
    seen: list[tuple[str, Any]] = []

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec.replicas", registry=registry)
    def updated(old: Any, new: Any, **_: Any) -> None:
        seen.append(("update", (old, new)))

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(name: str, **_: Any) -> None:
        seen.append(("delete", name))

    custom = client.CustomObjectsApi(k8s_api)
    apply_pool(k8s_api, pool_manifest("emails"))  # exists before the operator starts: seen by its listing
    async with running_operator(k8s_emulator, registry):
        # Until kopf has stored what it handled, a change would count as part of the creation.
        await wait_for(lambda: annotations(read_pool(k8s_api, "emails")).get(LAST_HANDLED), timeout=5)
        assert read_pool(k8s_api, "emails")["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "emails", {"spec": {"replicas": 3}})
        await wait_for(lambda: seen, timeout=5)
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "emails")
        await wait_for(lambda: not k8s_emulator.objects(POOLS), timeout=5)

    assert seen == [("update", (1, 3)), ("delete", "emails")]


# ------------------------------------------------------------------ (c) timers and daemons


async def test_timer_and_daemon_run_repeatedly_and_stop_with_the_operator(
    k8s_emulator: Emulator, k8s_api: client.ApiClient
) -> None:
    registry = kopf.OperatorRegistry()
    ticks: list[float] = []
    daemon_state = {"laps": 0, "exited": False}

    @kopf.timer(GROUP, VERSION, PLURAL, interval=0.05, registry=registry)
    def tick(**_: Any) -> None:
        ticks.append(time.monotonic())

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry)
    async def watcher(stopped: kopf.DaemonStopped, **_: Any) -> None:
        while not stopped:
            daemon_state["laps"] += 1
            await stopped.wait(0.05)
        daemon_state["exited"] = True

    apply_pool(k8s_api, pool_manifest("emails"))
    async with running_operator(k8s_emulator, registry) as operator:
        await wait_for(lambda: len(ticks) >= 3 and daemon_state["laps"] >= 3, timeout=5)
    assert operator.task.done() and not operator.task.cancelled()  # stopped by its flag, not cancelled
    assert daemon_state["exited"]

    after_stop = (len(ticks), daemon_state["laps"])
    await asyncio.sleep(0.3)  # six timer intervals: nothing may run any more
    assert (len(ticks), daemon_state["laps"]) == after_stop
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftovers == [], leftovers


async def test_operator_restricted_to_a_namespace_ignores_others(
    k8s_emulator: Emulator, k8s_api: client.ApiClient
) -> None:
    registry = kopf.OperatorRegistry()
    handled: list[tuple[str, str]] = []

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(namespace: str, name: str, **_: Any) -> None:
        handled.append((namespace, name))

    async with running_operator(k8s_emulator, registry, namespaces=[NS]):
        apply_pool(k8s_api, pool_manifest("elsewhere"), namespace="other")
        apply_pool(k8s_api, pool_manifest("here"))
        await wait_for(lambda: handled, timeout=5)
        await asyncio.sleep(0.2)  # time enough for a wrong-namespace event to be handled too

    assert handled == [(NS, "here")]
    watches = {r.url.path for r in k8s_emulator.requests if r.params.get("watch") == "true"}
    assert watches == {f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"}
