"""Which kombu transport and TLS settings the operator's Celery apps get for a broker URL."""

from __future__ import annotations

import ssl

import pytest

from celery_worker_operator.brokers import kombu_tls, kombu_transport
from celery_worker_operator.brokers.kombu_redis import SentinelTransport, Transport


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://h:6379/0", Transport),
        ("rediss://h:6380/0", Transport),
        ("sentinel://a:26379;sentinel://b:26379/0", SentinelTransport),
        ("amqp://guest:guest@h//", None),
    ],
)
def test_redis_urls_get_the_shared_command_transport_and_others_kombus_own(url: str, transport: type | None) -> None:
    assert kombu_transport(url) is transport


def test_a_rediss_url_without_tls_parameters_verifies_the_server_as_the_command_connection_does() -> None:
    assert kombu_tls("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert kombu_tls("rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem") is None  # the URL's own
    assert kombu_tls("redis://h:6379/0") is None
