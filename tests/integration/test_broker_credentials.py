"""Credentials from separate Secret keys: the operator's URL and the workers' `$(VAR)` URL log in
to a real password-protected Redis alike, and the password shows in no error."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from celery_worker_operator.brokers import BrokerAuthFailed, open_probe
from celery_worker_operator.localmode import local_broker_url
from celery_worker_operator.spec import BrokerSpec, CeleryWorkerPool
from celery_worker_operator.urls import PASSWORD_ENV, with_credentials
from celery_worker_operator.workloads.kubernetes import BROKER_ENV, broker_env
from tests.support.celery_app import HOLD, make_app
from tests.support.kubelet import expand
from tests.support.redis_server import PrivateRedis
from tests.unit.test_workloads import managed_pool

pytestmark = [pytest.mark.brokers, pytest.mark.timeout(60)]

# What a generated password holds: the characters that would break a URL pasted together naively.
PASSWORD = f"p@ss:w0rd!$&*+,=~-{uuid.uuid4().hex[:8]}"


def pool_reading_password(port: int) -> CeleryWorkerPool:
    pool = managed_pool()
    document = pool.model_dump(by_alias=True, exclude_none=True)
    document["spec"]["broker"] = {
        "url": f"redis://127.0.0.1:{port}/0",
        "passwordFrom": {"secretKeyRef": {"name": "redis-login", "key": "password"}},
    }
    return type(pool).model_validate(document)


def pod_broker_url(env: list[dict[str, object]], secret_values: dict[str, str]) -> str:
    """CELERY_BROKER_URL as a kubelet makes it: Secret values in, then `$(VAR)` expanded in order."""
    values: dict[str, str] = {}
    for entry in env:
        source = entry.get("valueFrom")
        key = source["secretKeyRef"]["key"] if isinstance(source, dict) and "secretKeyRef" in source else None
        values[str(entry["name"])] = secret_values[key] if key else expand(str(entry.get("value", "")), values)
    return values[BROKER_ENV]


def test_workers_and_operator_reach_the_broker_with_one_password(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, PASSWORD) as server:
        pool = pool_reading_password(server.port)
        operator_url = with_credentials(str(pool.spec.broker.url), None, PASSWORD)  # as secrets.py makes it
        worker_url = pod_broker_url(broker_env(pool), {"password": PASSWORD})
        app = make_app(worker_url)
        app.send_task(HOLD, args=[0], queue="creds")
        app.close()
        probe = open_probe(operator_url)
        assert probe.stats(["creds"])["creds"].depth == 1
        probe.close()
        assert local_broker_url(pool.spec.broker, {PASSWORD_ENV: PASSWORD}) == operator_url


def test_a_refused_password_is_never_shown(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, "the-right-one") as server:
        broker = BrokerSpec(url=f"redis://127.0.0.1:{server.port}/0")
        probe = open_probe(with_credentials(str(broker.url), None, PASSWORD))
        with pytest.raises(BrokerAuthFailed) as caught:
            probe.stats(["q"])
        probe.close()
    for text in (str(caught.value), repr(caught.value)):
        assert PASSWORD not in text and quote(PASSWORD, safe="") not in text
