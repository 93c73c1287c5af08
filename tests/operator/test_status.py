"""`celery-worker-operator status` (and `kubectl cwp status`) against the real control plane, showing
a live pool that the operator, running as the chart's ServiceAccount, scales with real workers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from celery_worker_operator.spec import CeleryWorkerPoolStatus
from tests.support.celery_app import make_app
from tests.support.cluster import BIN, Cluster
from tests.support.kubelet import ProcessKubelet
from tests.support.operator_process import OperatorSetup
from tests.support.pools import apply_pool, create_secret, events_for, pool_manifest, read_pool
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
PLUGIN = Path(sys.executable).parent / "kubectl-cwp"  # the console script `pip install` puts next to python


def cli_env(cluster: Cluster) -> dict[str, str]:
    """What a person at a terminal has: the admin kubeconfig, and kubectl and the plugin on PATH."""
    path = os.pathsep.join([str(PLUGIN.parent), str(BIN), os.environ.get("PATH", "")])
    return {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": path}


def status_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "celery_worker_operator.cli", "status", *args]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(cluster), cwd=ROOT, timeout=60)


def shown(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_status_shows_a_live_pool_and_json_is_its_status(
    operator: OperatorSetup,
    kubelet: ProcessKubelet,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
    tmp_path: Path,
) -> None:
    name, queue = names
    ns, cluster = kube_namespace, operator.cluster
    create_secret(kube_api, ns, f"{name}-broker", redis_url)
    watched = tmp_path / "watch.out"
    with operator.run() as running:
        apply_pool(kube_api, ns, pool_manifest(name, queue, maxReplicas=3))
        wait_for(lambda: read_pool(kube_api, ns, name).get("status", {}), lambda s: s.get("workersOnline") == 1, 90)
        with watched.open("w") as out:
            command = [sys.executable, "-m", "celery_worker_operator.cli", "status", name, "-n", ns, "-w"]
            watcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cli_env(cluster), cwd=ROOT)
        try:
            sender = make_app(redis_url)
            for number in range(20):  # 20 x 1 s / 5 s target = 4 slots: a second worker of 2
                sender.send_task("local.record", (queue, number, 1.0), queue=queue)
            wait_for(lambda: events_for(kube_api, ns, name, "ScaledUp"), bool, timeout=60)
            views = wait_for(watched.read_text, lambda text: text.count(f"pool {ns}/{name}") >= 2, timeout=60)
            assert "ScaledUp" in wait_for(watched.read_text, lambda text: "ScaledUp" in text, timeout=30), views
        finally:
            watcher.terminate()
            watcher.wait(10)

        # The pod the burst added started while the operator watched: its start-up is measured.
        startup = wait_for(
            lambda: read_pool(kube_api, ns, name)["status"].get("workerStartupSeconds"), bool, timeout=30
        )
        print(f"measured start-up: {startup} s")
        assert 0.2 < startup < 30, "a pod's worker starts in seconds"
        text = shown(status_cli(cluster, name, "-n", ns))
        for expected in (f"pool {ns}/{name}", queue, "MetricsAvailable", "WorkersRunning", "ScaledUp", "desired"):
            assert expected in text, text
        assert re.search(r"start-up +[\d.]+s", text), text

        listed = shown(status_cli(cluster, "-A")).splitlines()
        assert listed[0].split()[:2] == ["NAMESPACE", "NAME"], listed
        (row,) = [line.split() for line in listed[1:] if name in line.split()]
        assert row[:3] == [ns, name, queue], row

        plugin = subprocess.run(
            [str(BIN / "kubectl"), "cwp", "status", name, "-n", ns],
            capture_output=True, text=True, env=cli_env(cluster), timeout=60,
        )  # fmt: skip
        assert f"pool {ns}/{name}" in shown(plugin) and "MetricsAvailable" in plugin.stdout

        missing = status_cli(cluster, f"{name}-nope", "-n", ns)
        assert missing.returncode == 2, missing
        assert f"CeleryWorkerPool {ns}/{name}-nope not found" in missing.stderr and "Traceback" not in missing.stderr
        running.assert_alive()

    time.sleep(1)  # the operator is gone: the status stays as it last wrote it
    stored = read_pool(kube_api, ns, name)["status"]
    as_json = json.loads(shown(status_cli(cluster, name, "-n", ns, "-o", "json")))
    assert as_json["status"] == stored
    assert (
        CeleryWorkerPoolStatus.model_validate(as_json["status"]).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
        == stored
    ), "the status shown does not read back into the API's model"
    assert {"ScaledUp"} <= {event["reason"] for event in as_json["events"]}
    assert yaml.safe_load(shown(status_cli(cluster, name, "-n", ns, "-o", "yaml"))) == as_json
    listed_json = json.loads(shown(status_cli(cluster, "-n", ns, "-o", "json")))
    assert [item["name"] for item in listed_json["items"]] == [name]
