"""Shared fixtures: the real brokers that `scripts/brokers.sh` starts, and (from
tests.support.cluster) the real Kubernetes control plane that `scripts/cluster.sh` builds and starts.

Tests find them through CWO_TEST_REDIS_URL / CWO_TEST_AMQP_URL. A missing broker fails the test
with a clear message under CI=true (a skipped broker test in CI would be a silent hole); outside CI
the test is skipped with the same message, so `pytest tests/unit` works on a laptop.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest_plugins = ["tests.support.cluster"]

REDIS_URL = os.environ.get("CWO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("CWO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Celery's form; the Sentinel watches master SENTINEL_MASTER, a Redis of its own (scripts/brokers.sh).
SENTINEL_URL = os.environ.get("CWO_TEST_SENTINEL_URL", "sentinel://127.0.0.1:26390/15")
SENTINEL_MASTER = os.environ.get("CWO_TEST_SENTINEL_MASTER", "cwo-master")
# A TLS-only Redis that wants a client certificate; the files of its private CA are in the brokers' state folder.
TLS_REDIS_URL = os.environ.get("CWO_TEST_TLS_REDIS_URL", "rediss://127.0.0.1:6391/15")
TLS_FILES = Path(os.environ.get("CWO_BROKER_STATE", "/tmp/cwo-brokers")) / "tls"
MANAGEMENT_URL = os.environ.get("CWO_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")


START = "`bash scripts/brokers.sh start`"


def _require(url: str, default_port: int, what: str) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as error:
        _unavailable(f"{what} is not reachable at {host}:{port} ({error}); start it with {START}")
    return url


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require(REDIS_URL, 6379, "Redis")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return _require(AMQP_URL, 5672, "RabbitMQ")


@pytest.fixture(scope="session")
def management_url() -> str:
    return _require(MANAGEMENT_URL, 15672, "RabbitMQ management API")


@pytest.fixture(scope="session")
def sentinel_url() -> str:
    return _require(SENTINEL_URL, 26379, "Redis Sentinel")


@dataclass(frozen=True)
class TLSRedis:
    """The TLS Redis of scripts/brokers.sh: `url` sets no TLS parameters; the CA signed both the server's
    certificate and the client certificate `cert` (with its `key`)."""

    url: str
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_redis() -> TLSRedis:
    url = _require(TLS_REDIS_URL, 6391, "the TLS Redis")
    server = TLSRedis(url, TLS_FILES / "ca.crt", TLS_FILES / "client.crt", TLS_FILES / "client.key")
    missing = [str(path) for path in (server.ca, server.cert, server.key) if not path.is_file()]
    if missing:
        _unavailable(f"the TLS Redis's files {', '.join(missing)} are missing; make them with {START}")
    return server
