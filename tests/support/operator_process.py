"""The operator as a platform team runs it, on the tests' real control plane.

`celery-worker-operator run --namespace NS` runs in its own process, authenticated as a
ServiceAccount that only the chart's own RBAC templates (rendered with Helm's Go SDK for a
single-namespace install) give rights to: a verb the chart forgets fails these tests, an extra one
fails tests/deploy/test_rbac.py. The CRD is the committed one, applied once per run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, utils
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec
from celery_worker_operator.workloads.lifeline import die_with_parent
from tests.deploy.chart import manifests
from tests.support.cluster import Cluster, service_account_token

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "deploy" / "crds" / "celeryworkerpools.celery-operator.dev.yaml"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
IMAGE_ENV = {"MALLOC_ARENA_MAX": "2"}  # what the Dockerfile sets: memory measured here is the image's


def install_crd(cluster: Cluster, timeout: float = 30.0) -> None:
    """Apply the committed CRD (server-side, as the README says) and wait until it is Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl(
        "wait", "--for=condition=Established", f"--timeout={int(timeout)}s", f"crd/{spec.PLURAL}.{spec.GROUP}"
    )


def install_rbac(
    api: client.ApiClient, namespace: str, watched: Sequence[str] = ()
) -> tuple[str, list[dict[str, Any]]]:
    """The chart's ServiceAccount (in `namespace`) and roles for an install watching `namespace`
    and `watched` only, created for real.

    Returns the ServiceAccount's name and the objects made (cluster-scoped ones must be deleted
    after the test: `remove_cluster_objects`)."""
    release = f"cwo-{uuid.uuid4().hex[:6]}"
    values = {"watch": {"clusterWide": False, "namespaces": [namespace, *watched]}, "fullnameOverride": release}
    objects = [o for o in manifests(values, namespace=namespace) if o["kind"] in RBAC_KINDS]
    for obj in objects:
        utils.create_from_dict(api, obj, namespace=obj["metadata"].get("namespace", namespace))
    (account,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    return account, objects


def remove_cluster_objects(api: client.ApiClient, objects: list[dict[str, Any]]) -> None:
    rbac = client.RbacAuthorizationV1Api(api)
    for obj in objects:
        delete = {"ClusterRole": rbac.delete_cluster_role, "ClusterRoleBinding": rbac.delete_cluster_role_binding}
        if obj["kind"] in delete:
            try:
                delete[obj["kind"]](obj["metadata"]["name"])
            except ApiException as error:
                if error.status != 404:
                    raise


def write_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a bearer token, as an in-cluster pod would."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_file)}}
        ],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class OperatorProcess:
    """A running `celery-worker-operator run`; its output goes to `log_path`."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, as the kubelet stops the operator's pod; SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def assert_alive(self) -> None:
        assert self.popen.poll() is None, f"the operator exited with {self.popen.returncode}:\n{self.log()[-4000:]}"


@contextmanager
def running_operator(
    cluster: Cluster,
    kubeconfig: Path,
    namespaces: Sequence[str],
    log_path: Path,
    extra_args: tuple[str, ...] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[OperatorProcess]:
    """`celery-worker-operator run --namespace NS... [extra_args]` as its ServiceAccount, in the
    image's environment (plus `extra_env`), until the block ends."""
    metrics_port = free_port()
    env = {**os.environ, **IMAGE_ENV, "KUBECONFIG": str(kubeconfig), **(extra_env or {})}
    command = [
        sys.executable, "-m", "celery_worker_operator.cli", "run", *(f"--namespace={ns}" for ns in namespaces),
        "--liveness", f"http://127.0.0.1:{free_port()}/healthz", "--metrics-port", str(metrics_port), *extra_args,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        # A killed test run stops it too (kopf exits on SIGTERM), so it scales nothing afterwards.
        stops = die_with_parent(signal.SIGTERM)
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, preexec_fn=stops)
    process = OperatorProcess(popen, log_path, metrics_port)
    try:
        yield process
    finally:
        process.stop()


@dataclass
class OperatorSetup:
    """What a test needs to start the operator as the chart installs it, in its namespace (watching
    that one and `watched`)."""

    cluster: Cluster
    namespace: str
    kubeconfig: Path
    logs: Path
    watched: tuple[str, ...] = ()

    @contextmanager
    def run(self, *extra_args: str, extra_env: Mapping[str, str] | None = None) -> Iterator[OperatorProcess]:
        """The operator, with `run`'s options after the chart's ones (e.g. `--allow-template hostPath`)
        and `extra_env` added to its environment."""
        log_path = self.logs / f"operator-{time.monotonic_ns()}.log"
        namespaces = (self.namespace, *self.watched)
        with running_operator(self.cluster, self.kubeconfig, namespaces, log_path, extra_args, extra_env) as process:
            try:
                yield process
            except BaseException:
                sys.stderr.write(f"--- operator log ({log_path}) ---\n{process.log()[-6000:]}\n")
                raise


@contextmanager
def operator_setup(
    cluster: Cluster, api: client.ApiClient, namespace: str, logs: Path, watched: Sequence[str] = ()
) -> Iterator[OperatorSetup]:
    """CRD, the chart's RBAC for `namespace` (and `watched`), a token for its ServiceAccount, and a
    kubeconfig with it."""
    install_crd(cluster)
    account, objects = install_rbac(api, namespace, watched)
    try:
        token = service_account_token(api, namespace, account, seconds=3600)
        kubeconfig = write_kubeconfig(cluster, token, logs / "operator.kubeconfig")
        yield OperatorSetup(cluster, namespace, kubeconfig, logs, tuple(watched))
    finally:
        remove_cluster_objects(api, objects)
