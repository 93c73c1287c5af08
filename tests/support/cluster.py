"""A real Kubernetes control plane for the tests: `scripts/cluster.sh` (etcd, kube-apiserver with RBAC,
kube-controller-manager) plus a namespace per test and the process kubelet (`tests.support.kubelet`).

Fixtures (register them with ``pytest_plugins = ["tests.support.cluster"]`` in the top conftest, or
import them into a conftest, as tests/cluster/conftest.py does):

``kube_cluster`` (session) -> `Cluster`
    Starts the control plane once per test run with ``scripts/cluster.sh start``, or reuses the one
    running from the same state folder (``.cluster/state``, or ``CWO_CLUSTER_STATE``). Sessions
    running at once share it; the last one to finish stops it if a session started it (one started
    by hand stays up). ``CWO_CLUSTER_KEEP=1`` leaves it up anyway.
``kube_api`` -> ``kubernetes.client.ApiClient`` with the admin (``system:masters``) certificate.
``kube_namespace`` -> str
    A fresh namespace for the test (its ``default`` ServiceAccount already there, so pods pass the
    ServiceAccount admission plugin), deleted afterwards with everything in it.
``kubelet`` -> `ProcessKubelet`
    A running process kubelet for ``kube_namespace``: it binds that namespace's pods to its own Node
    and runs them as real processes; every process is killed when the test ends.

Binaries come from ``KUBEBUILDER_ASSETS`` (etcd, kube-apiserver, kubectl, kube-controller-manager if
there) or from ``.cluster/bin`` (built from tools/cluster with Go). They are built, when missing or
stale, once after collection and before the first test (a cold build takes ~10 min on 2 cores, so
it happens outside any test's timeout). With neither Go nor ready binaries the fixtures skip, except
under CI=true, where they fail: a skipped cluster test in CI would be a silent hole.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.support.kubelet import ProcessKubelet

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster.sh"
STATE = Path(os.environ.get("CWO_CLUSTER_STATE") or ROOT / ".cluster" / "state")
BIN = Path(os.environ.get("CWO_CLUSTER_BIN") or ROOT / ".cluster" / "bin")
FIXTURE = "kube_cluster"

_build_error: str | None = None
_ensured = False


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(message: str) -> NoReturn:
    """Skip the test, or fail it under CI=true."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def unavailable_reason() -> str | None:
    """Why no control plane can be started here, or None when it can."""
    missing = [tool for tool in ("bash", "openssl", "curl", "python3") if shutil.which(tool) is None]
    if missing:
        return f"no Kubernetes control plane for the tests: {', '.join(missing)} missing"
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and all(Path(assets, name).is_file() for name in ("etcd", "kube-apiserver", "kubectl")):
        return None
    if (BIN / "cwo-cluster").is_file() or shutil.which("go"):
        return None
    return (
        "no Kubernetes control plane for the tests: install Go >= 1.26 (scripts/cluster.sh builds one from "
        "tools/cluster) or set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver and kubectl"
    )


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries before the first cluster test, outside its timeout (only if some test needs them)."""
    global _build_error, _ensured
    if _ensured or session.config.option.collectonly:
        return
    if not any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        return
    _ensured = True  # once, though several conftests may import this hook
    if unavailable_reason() is not None or not shutil.which("go"):
        return
    capture = session.config.pluginmanager.get_plugin("capturemanager")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    if reporter is not None:
        reporter.write_line("cluster: checking the control-plane binaries (a cold build takes ~10 min)")
    with capture.global_and_fixture_disabled() if capture is not None else _nothing():
        result = subprocess.run(["bash", str(SCRIPT), "ensure"], cwd=ROOT, check=False, timeout=3600)
    if result.returncode != 0:
        _build_error = f"scripts/cluster.sh ensure failed (exit {result.returncode}); see its output above"
    elif reporter is not None:
        reporter.write_line(f"cluster: binaries ready after {time.monotonic() - started:.0f} s")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


@dataclass(frozen=True)
class Cluster:
    """A running control plane: where it answers and how to talk to it."""

    state: Path
    kubeconfig: Path
    server: str
    ca_file: Path
    controllers: frozenset[str]
    started_here: bool

    @classmethod
    def from_state(cls, state: Path, started_here: bool) -> Cluster:
        ports = dict(line.split("=", 1) for line in (state / "ports").read_text().split())
        controllers_file = state / "controllers"
        names = controllers_file.read_text().strip() if controllers_file.exists() else ""
        return cls(
            state=state,
            kubeconfig=state / "kubeconfig",
            server=f"https://127.0.0.1:{ports['apiserver_port']}",
            ca_file=state / "pki" / "ca.crt",
            controllers=frozenset(filter(None, names.split(","))),
            started_here=started_here,
        )

    def api_client(self) -> client.ApiClient:
        """A `kubernetes` ApiClient with the admin certificate (group system:masters)."""
        return api_client_from_kubeconfig(self.kubeconfig)

    def token_client(self, token: str) -> client.ApiClient:
        """A `kubernetes` ApiClient that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        configuration = client.Configuration(host=self.server)
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)

    def require_controllers(self, *names: str) -> None:
        """Skip (fail under CI) unless kube-controller-manager runs the named controllers."""
        lacking = [name for name in names if name not in self.controllers]
        if lacking:
            unavailable(f"the control plane runs no kube-controller-manager with {', '.join(lacking)}")

    def kubectl(self, *args: str) -> str:
        result = run_script("kubectl", *args, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout


def api_client_from_kubeconfig(path: str | Path) -> client.ApiClient:
    """A `kubernetes` ApiClient from a kubeconfig file (its current context)."""
    return config.new_client_from_config(config_file=str(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[Cluster]:
    """The control plane of STATE, shared by every pytest session using that folder at once: the last
    session to finish stops it if a session started it (one started by hand is left running)."""
    reason = unavailable_reason()
    if reason is not None:
        unavailable(reason)
    if _build_error is not None:
        pytest.fail(_build_error)
    STATE.parent.mkdir(parents=True, exist_ok=True)
    starting = STATE.parent / f"{STATE.name}.start.lock"
    users = (STATE.parent / f"{STATE.name}.users.lock").open("a")  # a shared flock per session using it
    started_here = False
    try:
        with _locked(starting):
            if run_script("status", timeout=30).returncode != 0:
                result = run_script("start", timeout=1800)
                if result.returncode != 0:
                    pytest.fail(f"scripts/cluster.sh start failed:\n{result.stdout}{result.stderr}")
                (STATE / "started-by-pytest").touch()
                started_here = True
            fcntl.flock(users, fcntl.LOCK_SH)
        yield Cluster.from_state(STATE, started_here)
    finally:
        with _locked(starting):
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while another session uses it
                last = True
            except BlockingIOError:
                last = False
            keep = os.environ.get("CWO_CLUSTER_KEEP", "") not in ("", "0")
            if last and not keep and (STATE / "started-by-pytest").exists():
                run_script("stop", timeout=60)
            users.close()


@pytest.fixture
def kube_api(kube_cluster: Cluster) -> Iterator[client.ApiClient]:
    api = kube_cluster.api_client()
    try:
        yield api
    finally:
        api.close()


def namespace_name(test_name: str) -> str:
    """A DNS-label namespace name from the test's name, unique per call."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:45].strip("-")
    return f"t-{stem}-{uuid.uuid4().hex[:6]}"


def wait_for_default_service_account(api: client.ApiClient, namespace: str, timeout: float = 60.0) -> None:
    core, deadline = client.CoreV1Api(api), time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_service_account("default", namespace, _preload_content=False)
            return
        except ApiException as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise AssertionError(
                    f"namespace {namespace} got no default ServiceAccount within {timeout} s"
                ) from error
        time.sleep(0.1)


@contextlib.contextmanager
def fresh_namespace(cluster: Cluster, api: client.ApiClient, name: str) -> Iterator[str]:
    """Namespace `name`, made now (with its default ServiceAccount) and deleted with all in it afterwards."""
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": {"cwo.test/namespace": "1"}}}, _preload_content=False)
    try:
        if "serviceaccount" in cluster.controllers:
            wait_for_default_service_account(api, name)
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background", _preload_content=False)
        except ApiException as error:
            if error.status != 404:
                raise


@contextlib.contextmanager
def process_kubelet(cluster: Cluster, namespace: str) -> Iterator[ProcessKubelet]:
    """A running process kubelet for `namespace`'s pods; fails the test if its threads hit errors."""
    api = cluster.api_client()
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "operator"), str(ROOT), os.environ.get("PYTHONPATH")]))
    node = ProcessKubelet(api, namespace=namespace, env={"PYTHONPATH": pythonpath})
    try:
        with node:
            yield node
        if node.errors:
            raise AssertionError("the process kubelet hit errors:\n" + "\n".join(node.errors))
    finally:
        api.close()


@pytest.fixture
def kube_namespace(kube_cluster: Cluster, kube_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(kube_cluster, kube_api, namespace_name(request.node.name)) as name:
        yield name


@pytest.fixture
def kubelet(kube_cluster: Cluster, kube_namespace: str) -> Iterator[ProcessKubelet]:
    with process_kubelet(kube_cluster, kube_namespace) as node:
        yield node


def service_account_token(api: client.ApiClient, namespace: str, name: str, seconds: int = 600) -> str:
    """A bound token for a ServiceAccount (TokenRequest API), to act as it with `Cluster.token_client`."""
    core = client.CoreV1Api(api)
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": seconds}}
    response = core.create_namespaced_service_account_token(name, namespace, body, _preload_content=False)
    return str(json.loads(response.data)["status"]["token"])


def decode_secret(data: dict[str, str]) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in data.items()}
