"""The real control plane works: API server, RBAC, the controllers we run, and the process kubelet.

kube-apiserver, etcd and kube-controller-manager come from scripts/cluster.sh; pods run as real local
processes through tests.support.kubelet.ProcessKubelet (no scheduler, no real kubelet).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.support.cluster import Cluster, run_script, service_account_token
from tests.support.kubelet import ProcessKubelet, expand, quantity
from tests.support.waiting import wait_for

T = TypeVar("T")

# A long-running pod process: says who it is, and on SIGTERM says so and exits 0.
SLEEPER = """
import json, os, signal, sys, time
def stop(signum, frame):
    print("got SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("running", json.dumps({"argv": sys.argv[1:], "pod": os.environ.get("POD_NAME")}), flush=True)
while True:
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: the kubelet reaps its children, so this is only for a moment.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1][0] != "Z"


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a `kubernetes` API method and return the JSON body as plain data."""
    return json.loads(call(*args, _preload_content=False, **kwargs).data)


def pods(api: client.ApiClient, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    return list(raw(client.CoreV1Api(api).list_namespaced_pod, namespace, label_selector=selector)["items"])


def ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod.get("status", {}).get("phase") == "Running" and conditions.get("Ready") == "True"


def sleeper_deployment(name: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 20,
                    "containers": [
                        {
                            "name": "sleeper",
                            "image": "python:3",
                            "command": ["python", "-c", SLEEPER],
                            "args": ["--name", "$(POD_NAME)"],
                            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        }
                    ],
                },
            },
        },
    }


def run_deployment(
    api: client.ApiClient, kubelet: ProcessKubelet, namespace: str, name: str, replicas: int
) -> list[dict[str, Any]]:
    """Create the Deployment and wait until its pods are bound to the kubelet's node and Ready
    (Ready once the process said "running": its SIGTERM handler is in place by then)."""
    kubelet.ready_when = lambda pod, container, output: output.startswith("running ")
    client.AppsV1Api(api).create_namespaced_deployment(
        namespace, sleeper_deployment(name, replicas), _preload_content=False
    )
    running = wait_for(
        lambda: [pod for pod in pods(api, namespace, f"app={name}") if ready(pod)],
        lambda found: len(found) == replicas,
        timeout=60,
    )
    return sorted(running, key=lambda pod: pod["metadata"]["name"])


# ---------------------------------------------------------------------------------- API server


def test_the_api_server_answers_readyz(kube_cluster: Cluster, kube_api: client.ApiClient) -> None:
    context = ssl.create_default_context(cafile=str(kube_cluster.ca_file))
    pki = kube_cluster.state / "pki"
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(f"{kube_cluster.server}/readyz", context=context, timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"ok"
    version = raw(client.VersionApi(kube_api).get_code)
    assert version["gitVersion"].startswith("v1."), version


def test_rbac_refuses_a_service_account_without_a_role(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "robot"}}, _preload_content=False)
    token = service_account_token(kube_api, kube_namespace, "robot")
    robot = kube_cluster.token_client(token)
    try:
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(robot).list_namespaced_pod(kube_namespace, _preload_content=False)
        assert refused.value.status == 403, refused.value  # authenticated (no 401), not authorized
        assert f"system:serviceaccount:{kube_namespace}:robot" in str(refused.value.body)

        # With a Role that allows it, the same token lists pods: the 403 was RBAC's.
        rbac = client.RbacAuthorizationV1Api(kube_api)
        rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}
        rbac.create_namespaced_role(
            kube_namespace, {"metadata": {"name": "pod-lister"}, "rules": [rule]}, _preload_content=False
        )
        binding = {
            "metadata": {"name": "robot-lists-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister"},
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": kube_namespace}],
        }
        rbac.create_namespaced_role_binding(kube_namespace, binding, _preload_content=False)
        listed = wait_for(
            lambda: _status_of(lambda: client.CoreV1Api(robot).list_namespaced_pod(kube_namespace)),
            lambda status: status == 200,
            timeout=10,
        )
        assert listed == 200
    finally:
        robot.close()


def _status_of(call: Callable[[], Any]) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


# ---------------------------------------------------------------------------------- controllers


def test_service_accounts_get_tokens(kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str) -> None:
    kube_cluster.require_controllers("serviceaccount", "serviceaccount-token")
    core = client.CoreV1Api(kube_api)
    # The serviceaccount controller gave the fresh namespace its default ServiceAccount.
    assert raw(core.read_namespaced_service_account, "default", kube_namespace)["metadata"]["name"] == "default"

    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "robot"}}, _preload_content=False)
    secret = {
        "metadata": {"name": "robot-token", "annotations": {"kubernetes.io/service-account.name": "robot"}},
        "type": "kubernetes.io/service-account-token",
    }
    core.create_namespaced_secret(kube_namespace, secret, _preload_content=False)
    # The token controller fills the secret with a signed token, the namespace and the CA.
    data = wait_for(
        lambda: raw(core.read_namespaced_secret, "robot-token", kube_namespace).get("data") or {},
        lambda found: {"token", "ca.crt", "namespace"} <= found.keys(),
        timeout=30,
    )
    robot = kube_cluster.token_client(base64.b64decode(data["token"]).decode())
    try:
        review = raw(
            client.AuthenticationV1Api(robot).create_self_subject_review,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
    finally:
        robot.close()
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{kube_namespace}:robot"
    # A TokenRequest token (what pods get) works as well.
    assert service_account_token(kube_api, kube_namespace, "robot").count(".") == 2


def test_a_deployment_runs_its_pods_as_processes(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    kube_cluster.require_controllers("deployment", "replicaset")
    running = run_deployment(kube_api, kubelet, kube_namespace, "sleepers", 2)

    for pod in running:
        name = pod["metadata"]["name"]
        assert pod["spec"]["nodeName"] == kubelet.node_name
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
        assert pod["status"]["podIP"] == "127.0.0.1"
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and "running" in status["state"]
        pid = kubelet.pid(name)
        assert pid is not None and alive(pid)
        assert status["containerID"] == f"process://{pid}"
        # $(POD_NAME) in args was expanded from the env's fieldRef, as a kubelet does.
        assert kubelet.command(name)[-2:] == ["--name", name]
        said = "running " + json.dumps({"argv": ["--name", name], "pod": name})
        wait_for(lambda name=name: kubelet.log(name).splitlines(), lambda lines, said=said: said in lines, timeout=10)


def test_scaling_down_removes_the_pod_with_the_lower_deletion_cost(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    kube_cluster.require_controllers("deployment", "replicaset")
    first, second = run_deployment(kube_api, kubelet, kube_namespace, "sleepers", 2)
    core = client.CoreV1Api(kube_api)
    # Make the alphabetically first pod the cheap one, then the other way round would be as good.
    keep, drop = second["metadata"]["name"], first["metadata"]["name"]
    for name, cost in ((keep, "100"), (drop, "-100")):
        patch = {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": cost}}}
        core.patch_namespaced_pod(
            name, kube_namespace, patch, _content_type="application/merge-patch+json", _preload_content=False
        )
    keep_pid, drop_pid = kubelet.pid(keep), kubelet.pid(drop)
    assert keep_pid and drop_pid

    client.AppsV1Api(kube_api).patch_namespaced_deployment(
        "sleepers",
        kube_namespace,
        {"spec": {"replicas": 1}},
        _content_type="application/merge-patch+json",
        _preload_content=False,
    )

    remaining = wait_for(
        lambda: sorted(pod["metadata"]["name"] for pod in pods(kube_api, kube_namespace, "app=sleepers")),
        lambda names: names == [keep],
        timeout=60,
    )
    assert remaining == [keep]
    assert kubelet.signals(drop) == ["SIGTERM"]  # graceful: no SIGKILL needed
    assert "got SIGTERM" in kubelet.log(drop).splitlines()
    (exit_,) = [e for e in kubelet.exits if e.pod == drop]
    assert exit_.returncode == 0 and exit_.pid == drop_pid
    assert not alive(drop_pid)
    assert alive(keep_pid) and kubelet.signals(keep) == []


def test_deleting_the_deployment_collects_its_pods_and_processes(
    kube_cluster: Cluster, kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    kube_cluster.require_controllers("deployment", "replicaset", "garbagecollector")
    running = run_deployment(kube_api, kubelet, kube_namespace, "sleepers", 2)
    pids = {pod["metadata"]["name"]: kubelet.pid(pod["metadata"]["name"]) for pod in running}
    assert all(pids.values())

    client.AppsV1Api(kube_api).delete_namespaced_deployment(
        "sleepers", kube_namespace, propagation_policy="Background", _preload_content=False
    )
    wait_for(lambda: pods(kube_api, kube_namespace), lambda found: found == [], timeout=60)
    apps = client.AppsV1Api(kube_api)
    assert raw(apps.list_namespaced_replica_set, kube_namespace)["items"] == []
    for name, pid in pids.items():
        assert pid is not None and not alive(pid)
        assert kubelet.signals(name) == ["SIGTERM"]
        assert "got SIGTERM" in kubelet.log(name).splitlines()


# ---------------------------------------------------------------------------------- the process kubelet


def test_pod_env_is_resolved_as_a_kubelet_does(
    kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_secret(
        kube_namespace, {"metadata": {"name": "creds"}, "stringData": {"url": "redis://secret"}}, _preload_content=False
    )
    core.create_namespaced_config_map(
        kube_namespace,
        {"metadata": {"name": "conf", "labels": {}}, "data": {"queue": "q1", "level": "info"}},
        _preload_content=False,
    )
    dump = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}), flush=True)"
    pod = {
        "metadata": {"name": "env-dump", "labels": {"role": "probe"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "python:3",
                    "command": ["python", "-c", dump],
                    "args": ["-n", "w@$(POD_NAME)", "$(UNDEFINED)", "$$(POD_NAME)", "-Q", "$(QUEUE)"],
                    "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
                    "envFrom": [{"configMapRef": {"name": "conf"}, "prefix": "CONF_"}],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "ROLE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['role']"}}},
                        {"name": "BROKER", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "url"}}},
                        {"name": "QUEUE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "queue"}}},
                        {
                            "name": "MISSING",
                            "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}},
                        },
                        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                        {
                            "name": "MEM_MI",
                            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                        },
                        {"name": "HOST", "value": "$(POD_NAME).$(POD_NAMESPACE)"},
                    ],
                }
            ],
        },
    }
    core.create_namespaced_pod(kube_namespace, pod, _preload_content=False)
    phase = wait_for(
        lambda: raw(core.read_namespaced_pod, "env-dump", kube_namespace).get("status", {}).get("phase"),
        lambda value: value == "Succeeded",
        timeout=30,
    )
    assert phase == "Succeeded"
    line = next(line for line in kubelet.log("env-dump").splitlines() if line.startswith("{"))
    seen = json.loads(line)
    env = seen["env"]
    assert seen["argv"] == ["-n", "w@env-dump", "$(UNDEFINED)", "$(POD_NAME)", "-Q", "q1"]
    assert env["POD_NAME"] == "env-dump" and env["POD_NAMESPACE"] == kube_namespace
    assert env["ROLE"] == "probe" and env["BROKER"] == "redis://secret" and env["QUEUE"] == "q1"
    assert env["CONF_queue"] == "q1" and env["CONF_level"] == "info"
    assert "MISSING" not in env
    assert env["CPUS"] == "2" and env["MEM_MI"] == "1024"
    assert env["HOST"] == f"env-dump.{kube_namespace}"


def test_a_process_that_exits_is_restarted_per_restart_policy(
    kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    core = client.CoreV1Api(kube_api)

    def pod(name: str, policy: str, code: int) -> dict[str, Any]:
        command = ["python", "-c", f"import sys; print('bye', flush=True); sys.exit({code})"]
        container = {"name": "main", "image": "python:3", "command": command}
        return {"metadata": {"name": name}, "spec": {"restartPolicy": policy, "containers": [container]}}

    for body in (pod("always", "Always", 3), pod("never", "Never", 3), pod("done", "OnFailure", 0)):
        core.create_namespaced_pod(kube_namespace, body, _preload_content=False)

    def status(name: str) -> dict[str, Any]:
        return dict(raw(core.read_namespaced_pod, name, kube_namespace).get("status", {}))

    always = wait_for(
        lambda: status("always"),
        lambda s: any(c.get("restartCount", 0) >= 1 for c in s.get("containerStatuses", [])),
        timeout=30,
    )
    (container,) = always["containerStatuses"]
    assert container["lastState"]["terminated"]["exitCode"] == 3
    assert always["phase"] == "Running"
    never = wait_for(lambda: status("never"), lambda s: s.get("phase") == "Failed", timeout=30)
    assert never["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert never["containerStatuses"][0]["restartCount"] == 0
    done = wait_for(lambda: status("done"), lambda s: s.get("phase") == "Succeeded", timeout=30)
    assert done["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(
    kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    core = client.CoreV1Api(kube_api)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    )
    body = {
        "metadata": {"name": "stubborn"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": "python:3", "command": ["python", "-c", stubborn]}],
        },
    }
    core.create_namespaced_pod(kube_namespace, body, _preload_content=False)
    wait_for(lambda: kubelet.log("stubborn").splitlines(), lambda lines: "up" in lines, timeout=30)
    pid = kubelet.pid("stubborn")
    assert pid is not None
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", kube_namespace, _preload_content=False)
    wait_for(lambda: pods(kube_api, kube_namespace), lambda found: found == [], timeout=30)
    assert time.monotonic() - started >= 0.9  # the grace period was waited for
    assert kubelet.signals("stubborn") == ["SIGTERM", "SIGKILL"]
    assert not alive(pid)


def test_closing_the_kubelet_leaves_no_process_behind(kube_cluster: Cluster, kube_namespace: str) -> None:
    api = kube_cluster.api_client()
    core = client.CoreV1Api(api)
    # A pod whose process starts a child of its own: the whole process group must go.
    parent = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print('child', child.pid, flush=True); time.sleep(600)"
    )
    body = {
        "metadata": {"name": "family"},
        "spec": {"containers": [{"name": "main", "image": "python:3", "command": ["python", "-c", parent]}]},
    }
    try:
        with ProcessKubelet(api, namespace=kube_namespace) as node:
            core.create_namespaced_pod(kube_namespace, body, _preload_content=False)
            lines = wait_for(
                lambda: [line for line in node.log("family").splitlines() if line.startswith("child ")],
                bool,
                timeout=30,
            )
            pid = node.pid("family")
            child = int(lines[0].split()[1])
            assert pid is not None and alive(pid) and alive(child)
        assert not alive(pid)
        assert wait_for(lambda: alive(child), lambda up: not up, timeout=5) is False
        assert node.errors == []
    finally:
        api.close()


# A pod asking the API server who it is, with the in-cluster credentials a kubelet gives it.
WHO_AM_I = """
import json, os, ssl, urllib.request
account = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(f"{account}/token").read()
url = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
request = urllib.request.Request(f"{url}/apis/authentication.k8s.io/v1/selfsubjectreviews", json.dumps(review).encode(),
    {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
context = ssl.create_default_context(cafile=f"{account}/ca.crt")
user = json.load(urllib.request.urlopen(request, context=context))["status"]["userInfo"]
print("user", user["username"], "namespace", open(f"{account}/namespace").read(), flush=True)
"""


def test_with_api_server_a_pod_gets_its_service_account_token_at_the_in_cluster_path(
    kube_cluster: Cluster, kube_namespace: str
) -> None:
    """The ServiceAccount admission plugin's projected volume, mounted for the pod's process only."""
    api = kube_cluster.api_client()
    body = {
        "metadata": {"name": "who"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "python:3", "command": ["python", "-c", WHO_AM_I]}],
        },
    }
    try:
        with ProcessKubelet(api, namespace=kube_namespace, api_server=kube_cluster.server) as node:
            client.CoreV1Api(api).create_namespaced_pod(kube_namespace, body, _preload_content=False)
            finished = wait_for(lambda: node.exits, bool, timeout=30)
            assert finished[0].returncode == 0, node.log("who")
            assert node.log("who").split() == [
                "user", f"system:serviceaccount:{kube_namespace}:default", "namespace", kube_namespace
            ]  # fmt: skip
        assert not os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"), "nothing on the host"
    finally:
        api.close()


def test_the_kubelet_rides_out_an_api_server_restart(
    kube_api: client.ApiClient, kube_namespace: str, kubelet: ProcessKubelet
) -> None:
    core = client.CoreV1Api(kube_api)

    def sleeper(name: str) -> dict[str, Any]:
        container = {"name": "main", "image": "python:3", "command": ["python", "-c", SLEEPER]}
        return {"metadata": {"name": name}, "spec": {"terminationGracePeriodSeconds": 10, "containers": [container]}}

    def is_ready(name: str) -> bool:
        return ready(raw(core.read_namespaced_pod, name, kube_namespace))

    kubelet.ready_when = lambda pod, container, output: output.startswith("running ")
    core.create_namespaced_pod(kube_namespace, sleeper("before"), _preload_content=False)
    wait_for(lambda: is_ready("before"), bool, timeout=30)
    pid = kubelet.pid("before")

    restart = run_script("restart-apiserver", timeout=180)
    assert restart.returncode == 0, restart.stdout + restart.stderr

    # Its watch came back: a pod created now is bound and run, and a deletion is still honoured.
    core.create_namespaced_pod(kube_namespace, sleeper("after"), _preload_content=False)
    wait_for(lambda: is_ready("after"), bool, timeout=60)
    assert kubelet.pid("before") == pid and pid is not None and alive(pid)
    core.delete_namespaced_pod("before", kube_namespace, _preload_content=False)
    wait_for(lambda: [p["metadata"]["name"] for p in pods(kube_api, kube_namespace)], lambda n: n == ["after"], 30)
    assert kubelet.signals("before") == ["SIGTERM"] and not alive(pid)
    assert kubelet.errors == []


# ---------------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "a"),
        ("x-$(A)-$(B)", "x-a-b"),
        ("$(UNKNOWN)", "$(UNKNOWN)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("$A", "$A"),
        ("$(A", "$(A"),
        ("tail$", "tail$"),
        ("", ""),
    ],
)
def test_var_expansion_matches_the_kubelet(text: str, expected: str) -> None:
    assert expand(text, {"A": "a", "B": "b"}) == expected


def test_quantities() -> None:
    assert quantity("1500m") == 1.5
    assert quantity("1Gi") == 2**30
    assert quantity("2") == 2
    assert quantity("1e3") == 1000
