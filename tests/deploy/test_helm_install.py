"""`helm install` of the chart into the tests' real control plane, as a platform team runs it.

helm is built from the Go module helm.sh/helm/v4 (tests.support.helm). The chart's own Deployment pod
runs the operator: the process kubelet binds it and starts the image's entrypoint (the Dockerfile's
`celery-worker-operator run`) with the pod's args, authenticated as the chart's ServiceAccount by a
token bound to that pod (projected at its in-cluster path, as a kubelet mounts it). The readiness
probe is the chart's (`/healthz`), so `helm install --wait` waits for the operator to answer. The
`helm test` Pod runs the same way. What the tests' cluster has not, and the tests therefore set:
Service DNS and routing (the test Pod is given the operator's /healthz on the pod's address,
127.0.0.1, through the chart's `tests.healthzUrl`).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec
from celery_worker_operator.handlers import PREFIX
from tests.support.cluster import Cluster, namespace_name, run_script
from tests.support.helm import Helm
from tests.support.kubelet import ProcessKubelet, http_readiness
from tests.support.operator_process import free_port
from tests.support.pools import apply_pool, condition, create_secret, deployment, pool_manifest, read_pool
from tests.support.waiting import wait_for

from .chart import CHART, ROOT

pytestmark = pytest.mark.timeout(300)
FINALIZER = f"{PREFIX}/finalizer"
NO_FINALIZERS = '{"metadata":{"finalizers":null}}'
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+ (DEBUG|INFO|WARNING|ERROR) \S+ ")
CRD_NAME = f"{spec.PLURAL}.{spec.GROUP}"
ENTRYPOINT = next(
    json.loads(line.removeprefix("ENTRYPOINT"))
    for line in (ROOT / "Dockerfile").read_text().splitlines()
    if line.startswith("ENTRYPOINT")
)


@pytest.fixture
def helm(helm_bin: Path, kube_cluster: Cluster, tmp_path: Path) -> Helm:
    home = tmp_path / "helm"
    home.mkdir()
    return Helm(helm_bin, kube_cluster, home)


@contextmanager
def namespaces(api: client.ApiClient, *stems: str) -> Iterator[list[str]]:
    """Fresh namespaces; whatever of them is left at the end is deleted (in the background), after
    the recovery the README gives for pools whose operator is gone (their finalizer removed)."""
    core = client.CoreV1Api(api)
    names = [namespace_name(stem) for stem in stems]
    for name in names:
        core.create_namespace({"metadata": {"name": name, "labels": {"cwo.test/namespace": "1"}}})
    try:
        yield names
    finally:
        for name in names:
            kubectl("patch", spec.PLURAL, "--all", "-n", name, "--type=merge", "-p", NO_FINALIZERS)
            try:
                core.delete_namespace(name, propagation_policy="Background")
            except ApiException as error:
                if error.status != 404:
                    raise


@contextmanager
def release_named(helm: Helm, stem: str, namespace: str) -> Iterator[str]:
    """A release name unique to this run (its ClusterRole is cluster-wide), uninstalled at the end if left."""
    release = f"{stem}-{uuid.uuid4().hex[:4]}"
    try:
        yield release
    finally:
        helm.run("uninstall", release, "-n", namespace, "--ignore-not-found", "--wait", "--timeout=60s", timeout=90)


def image_entrypoint(pod: dict[str, Any], container: dict[str, Any]) -> list[str] | None:
    """What the operator image runs for a container without `command`: its ENTRYPOINT, then the args."""
    if container.get("command"):
        return None
    return [*ENTRYPOINT, *container.get("args", [])]


@contextmanager
def release_kubelet(cluster: Cluster, namespace: str) -> Iterator[ProcessKubelet]:
    """The process kubelet for the release's namespace: in-cluster API access and the chart's readiness probe."""
    api = cluster.api_client()
    node = ProcessKubelet(
        api, namespace=namespace, command_for=image_entrypoint, ready_when=http_readiness, api_server=cluster.server
    )
    try:
        with node:
            yield node
        assert not node.errors, "the process kubelet hit errors:\n" + "\n".join(node.errors)
    finally:
        api.close()


def install(helm: Helm, release: str, namespace: str, values: dict[str, Any], action: str = "install") -> str:
    """`helm install|upgrade --wait`: done once the operator's pod answers the chart's readiness probe."""
    values_file = helm.values_file(values, f"{action}.yaml")
    return helm(
        action, release, str(CHART), "-n", namespace, "-f", values_file, "--wait", "--timeout=120s", timeout=180
    )


def helm_test(helm: Helm, release: str, namespace: str) -> str:
    out = helm("test", release, "-n", namespace, "--timeout=120s", timeout=180)
    assert "Phase:          Succeeded" in out, out
    return out


def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
    """kubectl as the admin; the caller judges the exit code (`kubectl auth can-i` says no with 1)."""
    return run_script("kubectl", *args, timeout=90)


def can(account: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    result = kubectl("auth", "can-i", verb, resource, *where, f"--as={account}")
    return result.stdout.strip() == "yes"


def release_objects(helm: Helm, release: str, namespace: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(helm("get", "manifest", release, "-n", namespace)) if doc]


def still_there(objects: list[dict[str, Any]], home: Path) -> list[str]:
    """`kind/name` of those of `objects` that the API server still has."""
    path = home / "objects.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = kubectl("get", "-f", str(path), "--ignore-not-found", "-o", "name")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def crd_served() -> list[str]:
    result = kubectl("get", "--raw", f"/apis/{spec.API_VERSION}")
    return [r["name"] for r in json.loads(result.stdout)["resources"]] if result.returncode == 0 else []


def operator_pods(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    """The operator's pods (those of its ReplicaSet, not the test Pod), live ones only."""
    listed = client.CoreV1Api(api).list_namespaced_pod(namespace, _preload_content=False)
    return [
        pod
        for pod in json.loads(listed.data)["items"]
        if any(ref["kind"] == "ReplicaSet" for ref in pod["metadata"].get("ownerReferences", []))
        and not pod["metadata"].get("deletionTimestamp")
    ]


def namespace_conditions(api: client.ApiClient, name: str) -> dict[str, str]:
    """A Terminating namespace's conditions that are True, type -> message."""
    status = client.CoreV1Api(api).read_namespace(name).status
    return {c.type: c.message for c in status.conditions or [] if c.status == "True"}


def namespace_gone(api: client.ApiClient, name: str) -> bool:
    try:
        client.CoreV1Api(api).read_namespace(name)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_default_install_serves_the_crd_and_grants_the_cluster_wide_rights(
    helm: Helm, kube_api: client.ApiClient
) -> None:
    """Default values: every namespace, a ClusterRole; uninstall takes every object of the release."""
    with namespaces(kube_api, "release") as (release_ns,), release_named(helm, "cwo-defaults", release_ns) as release:
        out = helm("install", release, str(CHART), "-n", release_ns)  # no --wait: nothing runs its pod here
        assert "STATUS: deployed" in out and "serving pools in every namespace" in out, out
        helm.cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{CRD_NAME}")
        assert spec.PLURAL in crd_served()
        objects = release_objects(helm, release, release_ns)
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
        fullname = f"{release}-celery-worker-operator"
        assert {("ServiceAccount", fullname), ("ClusterRole", fullname), ("ClusterRoleBinding", fullname)} <= kinds
        assert len(still_there(objects, helm.home)) == len(objects), "every object of the release exists"
        account = f"system:serviceaccount:{release_ns}:{fullname}"
        assert can(account, "patch", "celeryworkerpools") and can(account, "create", "deployments.apps")
        assert not can(account, "delete", "deployments.apps"), "no more than the operator uses"

        helm("uninstall", release, "-n", release_ns, "--wait")
        assert still_there(objects, helm.home) == []
        assert not can(account, "patch", "celeryworkerpools")
        assert spec.PLURAL in crd_served(), "helm never deletes a chart's CRDs (nor the pools with them)"


def test_namespaced_install_manages_allowed_pools_helm_test_passes_upgrade_applies_and_uninstall_leaves_nothing(
    helm: Helm, kube_cluster: Cluster, kube_api: client.ApiClient, kubelet: ProcessKubelet, kube_namespace: str,
    redis_url: str,
) -> None:  # fmt: skip
    allowed = kube_namespace  # the `kubelet` fixture runs this namespace's worker pods
    with (
        namespaces(kube_api, "release", "other") as (release_ns, other),
        release_kubelet(kube_cluster, release_ns) as operator_node,
        release_named(helm, "cwo-ns", release_ns) as release,
    ):
        health_port, metrics_port = free_port(), free_port()
        values = {
            "watch": {"clusterWide": False, "namespaces": [allowed]},
            "health": {"port": health_port},
            "metrics": {"port": metrics_port},
            "tests": {"healthzUrl": f"http://127.0.0.1:{health_port}/healthz"},
            # Told to serve `other` too, which the chart's Roles do not cover: the API server refuses.
            "extraArgs": [f"--namespace={other}"],
        }
        install(helm, release, release_ns, values)
        objects = release_objects(helm, release, release_ns)
        roles = {(o["kind"], o["metadata"].get("namespace")) for o in objects if o["kind"] in ("Role", "RoleBinding")}
        assert roles == {("Role", allowed), ("RoleBinding", allowed)}
        assert spec.PLURAL in crd_served()
        account = f"system:serviceaccount:{release_ns}:{release}-celery-worker-operator"
        assert can(account, "patch", "celeryworkerpools", allowed) and not can(account, "list", "celeryworkerpools")
        (pod,) = operator_pods(kube_api, release_ns)
        operator = pod["metadata"]["name"]
        assert operator_node.command(operator)[:2] == ["celery-worker-operator", "run"]

        # Told to serve `other` as well, which no Role covers: the API server refuses, the operator says so
        # (kopf retries for about a minute, then the operator exits: the README's namespaces bullet).
        for namespace in (allowed, other):
            create_secret(kube_api, namespace, "orders-broker", redis_url)
            apply_pool(kube_api, namespace, pool_manifest("orders", f"helm-{allowed[-6:]}"))
        log = wait_for(lambda: operator_node.log(operator), lambda text: f'in the namespace "{other}"' in text, 30)
        assert "forbidden" in log and f'cannot list resource "{spec.PLURAL}"' in log
        assert TEXT_LINE.match(log) and not log.startswith("{"), "text by default: `time level logger message`"

        # Upgrade: JSON logs at DEBUG and only the namespaces the Roles cover; the Deployment rolls.
        upgraded = {**values, "logFormat": "json", "logLevel": "DEBUG", "extraArgs": []}
        install(helm, release, release_ns, upgraded, "upgrade")
        (pod,) = wait_for(lambda: operator_pods(kube_api, release_ns), lambda p: len(p) == 1, 60)
        assert pod["metadata"]["name"] != operator, "the changed arguments rolled the operator's pod"
        assert "SIGTERM" in operator_node.signals(operator), "Recreate: the old operator was stopped"
        operator = pod["metadata"]["name"]
        assert {"--log-format=json", "--log-level=DEBUG"} <= set(operator_node.command(operator))
        assert other not in " ".join(operator_node.command(operator))

        # The pool where the operator may work is managed; the one where it may not was never touched.
        wait_for(lambda: read_pool(kube_api, allowed, "orders"), lambda p: condition(p, "Ready") is not None, 60)
        wait_for(lambda: read_pool(kube_api, allowed, "orders").get("status", {}), lambda s: s.get("workersOnline"), 60)
        assert FINALIZER in read_pool(kube_api, allowed, "orders")["metadata"]["finalizers"]
        refused = read_pool(kube_api, other, "orders")
        assert "status" not in refused and deployment(kube_api, other, "orders") is None
        assert FINALIZER not in refused["metadata"].get("finalizers", [])
        lines = [line for line in operator_node.log(operator).splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert {"time", "level", "logger", "message"} <= records[0].keys()
        assert "DEBUG" in {record["level"] for record in records}

        # helm test: its Pod really runs (as the operator's ServiceAccount) and is deleted once it passed.
        helm_test(helm, release, release_ns)
        test_log = operator_node.log(f"{release}-celery-worker-operator-test")
        assert test_log.count("ok   ") == 3 and f"namespaces/{allowed}/celeryworkerpools" in test_log, test_log
        assert [p.metadata.name for p in client.CoreV1Api(kube_api).list_namespaced_pod(release_ns).items] == [
            operator
        ], "a passing test Pod is deleted"

        # The documented order: pools first (the operator removes its finalizer), then the release.
        for namespace in (allowed, other):
            helm.cluster.kubectl("delete", spec.PLURAL, "--all", "-n", namespace, "--wait", "--timeout=60s")
        wait_for(lambda: deployment(kube_api, allowed, "orders"), lambda made: made is None, 60)  # owner gone: GC
        helm("uninstall", release, "-n", release_ns, "--wait", "--timeout=120s", timeout=180)
        assert still_there(objects, helm.home) == []
        every = (allowed, release_ns, other)
        for namespace in every:
            client.CoreV1Api(kube_api).delete_namespace(namespace)
        wait_for(lambda: [n for n in every if not namespace_gone(kube_api, n)], lambda left: not left, 90)


def test_uninstalled_before_its_pools_the_finalizer_holds_them_until_removed_by_hand(
    helm: Helm, kube_cluster: Cluster, kube_api: client.ApiClient, redis_url: str
) -> None:
    """The wrong order: the operator goes first, its finalizer stays on the pool, deleting the pool (or
    its namespace) waits for it. The README's recovery: remove the finalizer; the rest follows."""
    with (
        namespaces(kube_api, "release", "pools") as (release_ns, pools_ns),
        release_kubelet(kube_cluster, release_ns),
        release_named(helm, "cwo-order", release_ns) as release,
    ):
        health_port = free_port()
        values = {
            "watch": {"clusterWide": False, "namespaces": [pools_ns]},
            "health": {"port": health_port},
            "metrics": {"port": free_port()},
            "dashboard": {"enabled": False},
        }
        install(helm, release, release_ns, values)
        create_secret(kube_api, pools_ns, "orders-broker", redis_url)
        apply_pool(kube_api, pools_ns, pool_manifest("orders", f"helm-{pools_ns[-6:]}", minReplicas=0))
        wait_for(lambda: read_pool(kube_api, pools_ns, "orders"), lambda p: condition(p, "Ready") is not None, 60)
        assert deployment(kube_api, pools_ns, "orders") is not None

        helm("uninstall", release, "-n", release_ns, "--wait", "--timeout=120s", timeout=180)
        deleting = kubectl("delete", spec.PLURAL, "orders", "-n", pools_ns, "--timeout=5s")
        assert deleting.returncode != 0 and "timed out" in deleting.stderr, "kubectl waits for the finalizer"
        client.CoreV1Api(kube_api).delete_namespace(pools_ns)
        # The namespace controller deletes everything else, then says what it waits for.
        remaining = wait_for(lambda: namespace_conditions(kube_api, pools_ns), lambda c: FINALIZER in c.get(
            "NamespaceFinalizersRemaining", ""), 60)  # fmt: skip
        assert "NamespaceContentRemaining" in remaining, remaining
        stuck = read_pool(kube_api, pools_ns, "orders")
        assert stuck["metadata"]["deletionTimestamp"] and stuck["metadata"]["finalizers"] == [FINALIZER]
        assert not namespace_gone(kube_api, pools_ns)

        # The recovery the README gives.
        patched = kubectl("patch", spec.PLURAL, "orders", "-n", pools_ns, "--type=merge", "-p", NO_FINALIZERS)
        assert patched.returncode == 0, patched.stderr
        wait_for(lambda: namespace_gone(kube_api, pools_ns), bool, 90)
