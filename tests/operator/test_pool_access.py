"""Who may create pools, on the real API server: the worker-template policy refuses what creating a pool
must not grant, until the operator allows it; the chart's aggregated roles let a namespace's editors
manage pools and nothing more; and nothing the operator writes shows a Secret's content.
"""

from __future__ import annotations

import base64
import urllib.request
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec
from tests.support.cluster import Cluster, service_account_token
from tests.support.operator_process import OperatorProcess, OperatorSetup, free_port
from tests.support.pools import apply_pool, condition, create_secret, deployment, events_for, pool_manifest, read_pool
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
WHERE = "spec.worker.template.spec"
RISKY_TEMPLATE = {
    "spec": {
        "serviceAccountName": "deployer",
        "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "node", "hostPath": {"path": "/var/run"}}],
    }
}
PLANTED = "PlantedS3cret"  # part of every password these tests put in Secrets; never to be seen again


def ready(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return condition(read_pool(api, namespace, name), "Ready") or {}


def test_a_risky_template_is_refused_until_the_operator_allows_it(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    name, queue = names
    ns, plain = kube_namespace, f"{name}-plain"
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    create_secret(kube_api, ns, f"{plain}-broker", redis_url)
    client.CoreV1Api(kube_api).create_namespaced_service_account(ns, {"metadata": {"name": "deployer"}})
    risky = pool_manifest(name, queue)
    risky["spec"]["worker"]["template"] = RISKY_TEMPLATE
    with operator.run() as running:
        apply_pool(kube_api, ns, risky)
        apply_pool(kube_api, ns, pool_manifest(plain, queue))
        refused = wait_for(lambda: ready(kube_api, ns, name), lambda c: c.get("reason") == "InvalidSpec", timeout=60)
        for path in (f"{WHERE}.serviceAccountName", f"{WHERE}.volumes[1].hostPath"):
            assert path in refused["message"], refused
        (event,) = wait_for(lambda: events_for(kube_api, ns, name, "InvalidSpec"), bool, timeout=30)
        assert event["type"] == "Warning" and f"{WHERE}.volumes[1].hostPath" in event["message"]
        # The other pool of the namespace is served meanwhile; the refused one never gets a Deployment.
        wait_for(lambda: deployment(kube_api, ns, plain), bool, timeout=30)
        wait_for(lambda: ready(kube_api, ns, plain), lambda c: c.get("status") == "True", timeout=60)
        assert deployment(kube_api, ns, name) is None
        running.assert_alive()

    with operator.run("--allow-template", "serviceAccountName,hostPath"):
        made = wait_for(lambda: deployment(kube_api, ns, name), bool, timeout=60)
        pod = made["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "deployer"
        assert {"name": "node", "hostPath": {"path": "/var/run", "type": ""}} in pod["volumes"]
        wait_for(lambda: ready(kube_api, ns, name), lambda c: c.get("status") == "True", timeout=60)


def bind(api: client.ApiClient, namespace: str, account: str, cluster_role: str) -> None:
    """A ServiceAccount bound in `namespace` to `cluster_role` (a RoleBinding, as a namespace admin grants it)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": account}})
    binding: Any = {
        "metadata": {"name": account},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    }
    rbac.create_namespaced_role_binding(namespace, binding)


def status_code(call: Any) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


def chart_pool_role(api: client.ApiClient, joins: str) -> str:
    """The name of a pool ClusterRole the chart's RBAC (installed by the `operator` fixture) made."""
    roles = client.RbacAuthorizationV1Api(api).list_cluster_role(
        label_selector=f"rbac.authorization.k8s.io/aggregate-to-{joins}=true,app.kubernetes.io/part-of=celery-worker-operator"
    )
    return next(r.metadata.name for r in roles.items if r.metadata.name.endswith("-pools-edit"))


def pools_api(cluster: Cluster, api: client.ApiClient, namespace: str, account: str) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.token_client(service_account_token(api, namespace, account)))


def secret(api: client.ApiClient, namespace: str, name: str, data: dict[str, str]) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    client.CoreV1Api(api).create_namespaced_secret(namespace, {"metadata": {"name": name}, "data": encoded})


def test_a_pool_editor_manages_pools_and_reads_no_secret_through_the_operator(
    operator: OperatorSetup, kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str
) -> None:
    ns = kube_namespace
    bind(kube_api, ns, "pool-editor", chart_pool_role(kube_api, "edit"))
    editor = pools_api(kube_cluster, kube_api, ns, "pool-editor")
    as_editor = editor.api_client
    closed = free_port()  # nothing listens: the broker URL with a password fails to connect
    secret(kube_api, ns, "login", {"user": "celery", "password": f"{PLANTED}/with-a-slash"})
    secret(kube_api, ns, "url", {"url": f"redis://:{PLANTED}-url@127.0.0.1:{closed}/0"})

    core, apps = client.CoreV1Api(as_editor), client.AppsV1Api(as_editor)
    assert status_code(lambda: core.read_namespaced_secret("login", ns)) == 403
    assert status_code(lambda: core.list_namespaced_secret(ns)) == 403
    made_by_hand: Any = {
        "metadata": {"name": "by-hand"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    assert status_code(lambda: apps.create_namespaced_deployment(ns, made_by_hand)) == 403

    login = {"secretKeyRef": {"name": "login", "key": "user"}}, {"secretKeyRef": {"name": "login", "key": "password"}}
    pools: dict[str, dict[str, Any]] = {
        "unusable": {"url": "redis://127.0.0.1:6379/0", "usernameFrom": login[0], "passwordFrom": login[1]},
        "unreachable": {"urlFrom": {"secretKeyRef": {"name": "url", "key": "url"}}},
        "missing": {"urlFrom": {"secretKeyRef": {"name": "url", "key": "nope"}}},
    }
    with operator.run() as running:
        for name, broker in pools.items():
            body = pool_manifest(name, "q-access")
            body["spec"]["broker"] = broker
            editor.create_namespaced_custom_object(spec.GROUP, spec.VERSION, ns, spec.PLURAL, body)
        wait_for(lambda: ready(as_editor, ns, "unusable"), lambda c: c.get("reason") == "SecretUnusable", timeout=60)
        wait_for(lambda: ready(as_editor, ns, "missing"), lambda c: c.get("reason") == "SecretMissing", timeout=60)
        blind = wait_for(
            lambda: condition(read_pool(as_editor, ns, "unreachable"), "MetricsAvailable") or {},
            lambda c: c.get("status") == "False",
            timeout=60,
        )
        assert f"127.0.0.1:{closed}" in blind["message"], "the broker is named, its password masked"
        scale = {"spec": {"replicas": 2}}
        editor.patch_namespaced_custom_object_scale(spec.GROUP, spec.VERSION, ns, spec.PLURAL, "missing", scale)
        assert read_pool(as_editor, ns, "missing")["spec"]["replicas"] == 2
        assert_nothing_shows(PLANTED, kube_api, ns, running, list(pools))
        for name in pools:
            editor.delete_namespaced_custom_object(spec.GROUP, spec.VERSION, ns, spec.PLURAL, name)
        running.assert_alive()


def assert_nothing_shows(
    planted: str, api: client.ApiClient, namespace: str, running: OperatorProcess, pools: list[str]
) -> None:
    """Not in any pool's status, any Event of the namespace, the operator's log or its metrics."""
    for name in pools:
        assert planted not in str(read_pool(api, namespace, name).get("status")), name
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert events and not [e.message for e in events if planted in (e.message or "")]
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as response:
        assert planted not in response.read().decode()
    assert planted not in running.log()


def test_namespace_editors_get_pools_through_the_aggregated_edit_role(
    operator: OperatorSetup, kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str
) -> None:
    """Bound to the cluster's own `edit` role, which the clusterrole-aggregation controller extends."""
    kube_cluster.require_controllers("clusterrole-aggregation")
    ns = kube_namespace
    bind(kube_api, ns, "team-editor", "edit")
    editor = pools_api(kube_cluster, kube_api, ns, "team-editor")
    body = pool_manifest("by-edit", "q-by-edit")

    def create() -> int:
        return status_code(
            lambda: editor.create_namespaced_custom_object(spec.GROUP, spec.VERSION, ns, spec.PLURAL, body)
        )

    assert wait_for(create, lambda code: code != 403, timeout=30) == 200
    listed = editor.list_namespaced_custom_object(spec.GROUP, spec.VERSION, ns, spec.PLURAL)["items"]
    assert [p["metadata"]["name"] for p in listed] == ["by-edit"]
    editor.delete_namespaced_custom_object(spec.GROUP, spec.VERSION, ns, spec.PLURAL, "by-edit")


def test_a_pool_named_after_someone_elses_deployment_does_not_take_it_over(
    operator: OperatorSetup, kube_api: client.ApiClient, kube_namespace: str, redis_url: str, names: tuple[str, str]
) -> None:
    """Else a pool named `payments` would put its image into Deployment payments' pods, ServiceAccount and all."""
    name, queue = names
    ns = kube_namespace
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    theirs: Any = {
        "metadata": {"name": name},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "payments"}},
            "template": {
                "metadata": {"labels": {"app": "payments"}},
                "spec": {"serviceAccountName": "payments", "containers": [{"name": "api", "image": "payments:1"}]},
            },
        },
    }
    client.AppsV1Api(kube_api).create_namespaced_deployment(ns, theirs)
    with operator.run() as running:
        apply_pool(kube_api, ns, pool_manifest(name, queue))
        refused = wait_for(lambda: ready(kube_api, ns, name), lambda c: c.get("status") == "False", timeout=60)
        assert refused["reason"] == "WorkloadNotOwned" and "will not take it over" in refused["message"]
        wait_for(lambda: events_for(kube_api, ns, name, "WorkloadNotOwned"), bool, timeout=30)
        running.assert_alive()
    left = deployment(kube_api, ns, name)
    assert left is not None and left["metadata"].get("ownerReferences") is None
    assert left["spec"]["replicas"] == 3
    assert [c["name"] for c in left["spec"]["template"]["spec"]["containers"]] == ["api"]
