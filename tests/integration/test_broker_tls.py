"""A rediss:// broker with a private CA that wants client certificates (the TLS Redis of
scripts/brokers.sh): the probe measures it with the files the operator writes from `broker.tls`,
a client without its certificate is refused plainly, and a worker started with the pods' own
`broker_use_ssl` setting is heard by the event monitor."""

from __future__ import annotations

import re
import shutil
import stat
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from celery_worker_operator.brokers import BrokerAuthFailed, BrokerUnavailable, open_probe
from celery_worker_operator.localmode import LocalRun, with_local_tls
from celery_worker_operator.manifests import parse_pool
from celery_worker_operator.secrets import PemFiles
from celery_worker_operator.spec import BrokerTLS, SecretKeyRef, ValueFrom
from celery_worker_operator.telemetry import EventMonitor
from celery_worker_operator.urls import tls_settings, with_tls
from celery_worker_operator.workloads.kubernetes import TLS_DIR, TLS_FILES, tls_arg
from tests.conftest import TLSRedis
from tests.support.celery_app import BROKER_ENV, HOLD, make_app
from tests.support.celery_procs import CeleryWorkers
from tests.support.local_pool import step_until
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(150)]
ROOT = Path(__file__).resolve().parents[2]


def operator_url(server: TLSRedis, pem_files: PemFiles) -> str:
    """The URL the operator's connections use, with the PEMs written as it writes the Secrets' values."""
    ca, cert, key = (pem_files.path(path.read_bytes()) for path in (server.ca, server.cert, server.key))
    return with_tls(server.url, tls_settings(ca, cert, key))


def test_the_probe_measures_every_priority_over_tls_with_the_client_certificate(tls_redis: TLSRedis) -> None:
    pem_files = PemFiles()
    url = operator_url(tls_redis, pem_files)
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    app = make_app(url)
    probe = open_probe(url)
    try:
        for priority in (0, 3, 3, 9):
            app.send_task(HOLD, args=[0], queue=queue, priority=priority)
        stats = probe.stats([queue])[queue]
        with Connection(url) as connection:
            kombu_size = connection.default_channel._size(queue)
        assert (stats.depth, stats.priorities[3], stats.priorities[9]) == (4, 2, 1)
        assert stats.depth == kombu_size, "as kombu's own channel counts it"
        directory = Path(pem_files.path(b"x")).parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {stat.S_IMODE(f.stat().st_mode) for f in directory.iterdir()} == {0o600}
    finally:
        probe.close()
        with Connection(url) as connection:
            connection.default_channel.queue_purge(queue)
        app.close()
        pem_files.close()
    assert not directory.exists(), "the files go with the operator"


# Without a client certificate, TLS 1.3 lets the client send its first command before the server's
# alert arrives: the alert is read (certificate required) or the write finds the connection closed.
NO_CLIENT_CERTIFICATE = r"certificate required|does it want a client certificate"


@pytest.mark.parametrize(
    ("files", "said", "kind"),
    [
        (("ca",), NO_CLIENT_CERTIFICATE, BrokerUnavailable),
        (("cert", "key"), "certificate verify failed", BrokerAuthFailed),
    ],
    ids=["no client certificate", "server not verifiable without the CA"],
)
def test_a_refused_certificate_says_so_without_the_password(
    tls_redis: TLSRedis, files: tuple[str, ...], said: str, kind: type[BrokerUnavailable]
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    given = {name: str(getattr(tls_redis, name)) if name in files else None for name in ("ca", "cert", "key")}
    url = with_tls(tls_redis.url.replace("://", f"://:{password}@"), tls_settings(**given))
    probe = open_probe(url)
    with pytest.raises(kind) as refused:
        probe.stats(["q"])
    probe.close()
    message = str(refused.value)
    assert re.search(said, message.lower()) and "broker.tls" in message, message
    assert password not in message


def test_the_event_monitor_hears_a_worker_started_as_a_pod_would_be(tls_redis: TLSRedis, tmp_path: Path) -> None:
    """The worker gets the plain URL (CELERY_BROKER_URL of a pod) and the Deployment's broker_use_ssl
    argument, with the mounted files at a local folder; the operator side uses its own URL query."""
    for field, name in TLS_FILES.items():
        source = {"ca_from": tls_redis.ca, "cert_from": tls_redis.cert, "key_from": tls_redis.key}[field]
        shutil.copy(source, tmp_path / name)
    ref = ValueFrom(secret_key_ref=SecretKeyRef(name="redis-tls", key="k"))
    pod_setting = tls_arg(BrokerTLS(ca_from=ref, cert_from=ref, key_from=ref)).replace(TLS_DIR, str(tmp_path))
    pem_files = PemFiles()
    url = operator_url(tls_redis, pem_files)
    pool = f"tls-{uuid.uuid4().hex[:8]}"
    monitor = EventMonitor(url, window=10.0).start()
    app = make_app(url)
    try:
        assert monitor.wait_connected(10), monitor.last_error
        with CeleryWorkers("tests.support.celery_app", tls_redis.url) as workers:
            hostname = workers.start(f"{pool}@one", [pool], extra_args=["-E", pod_setting])
            wait_for(lambda: monitor.snapshot(pool), lambda t: t.live_workers == 1, 45, interval=0.1)
            app.send_task(HOLD, args=[0], queue=pool)
            done = wait_for(lambda: monitor.snapshot(pool), lambda t: t.completed >= 1, 30, interval=0.1)
        assert hostname in done.workers
    finally:
        monitor.stop()
        app.close()
        pem_files.close()


def test_a_local_pool_runs_over_tls_from_the_command_line_files(
    tls_redis: TLSRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`local --broker-ca/--broker-cert/--broker-key` for a pool whose broker.tls reads Secrets:
    the pool wakes from zero on a backlog over TLS, its workers drain it and are heard."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "operator") + ":" + str(ROOT))
    name = f"tls-{uuid.uuid4().hex[:8]}"
    ref = {"secretKeyRef": {"name": "redis-tls", "key": "k"}}
    pool = parse_pool(
        {
            "apiVersion": "celery-operator.dev/v1alpha1",
            "kind": "CeleryWorkerPool",
            "metadata": {"name": name},
            "spec": {
                "broker": {"url": tls_redis.url, "tls": {"caFrom": ref, "certFrom": ref, "keyFrom": ref}},
                "queues": [name],
                "worker": {"app": "tests.support.celery_app:app", "image": "local", "concurrency": 2},
                "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "pollSeconds": 1, "taskDurationSeconds": 1},
            },
        }
    )
    url = with_local_tls(pool.spec.broker.url or "", pool.spec.broker.tls, tls_redis.ca, tls_redis.cert, tls_redis.key)
    monkeypatch.setenv(BROKER_ENV, url)  # the workers' app module reads it
    app = make_app(url)
    run = LocalRun(pool, url, cwd=ROOT, telemetry_window=10.0)
    try:
        for _ in range(4):
            app.send_task(HOLD, args=[0.2], queue=name)
        step_until(run, lambda: run.workload.observe().replicas > 0, timeout=10)
        step_until(run, lambda: run.reporter.status_now.get("depth") == 0, timeout=60)
        step_until(run, lambda: run.telemetry().live_workers > 0, timeout=30)
    finally:
        run.close()
        app.close()
