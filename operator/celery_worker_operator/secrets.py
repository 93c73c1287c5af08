"""Broker URLs as the operator reads them: inline (no password) or from a Secret's key."""

from __future__ import annotations

import base64

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .spec import CeleryWorkerPool, ValueFrom


class SecretMissing(Exception):
    """A referenced Secret or key is not there (yet); the text names them, never a value."""


def broker_urls(core: client.CoreV1Api, pool: CeleryWorkerPool) -> tuple[str, str | None]:
    """(broker URL, management API URL or None) for a pool, reading Secrets where it refers to them."""
    broker = pool.spec.broker
    namespace = pool.metadata.namespace
    url = broker.url if broker.url is not None else _read(core, namespace, broker.url_from)
    management = _read(core, namespace, broker.management_url_from) if broker.management_url_from else None
    return url, management


def _read(core: client.CoreV1Api, namespace: str, source: ValueFrom | None) -> str:
    assert source is not None
    ref = source.secret_key_ref
    try:
        secret = core.read_namespaced_secret(ref.name, namespace)
    except ApiException as error:
        if error.status == 404:
            raise SecretMissing(f"Secret {namespace}/{ref.name} not found") from None
        raise
    data = secret.data or {}
    if ref.key not in data:
        raise SecretMissing(f"Secret {namespace}/{ref.name} has no key {ref.key!r}") from None
    return base64.b64decode(data[ref.key]).decode()
