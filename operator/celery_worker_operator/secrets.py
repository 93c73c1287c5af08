"""Broker URLs as the operator reads them: inline (no password), from a Secret's key, or an inline
URL completed with a user name and password from Secret keys."""

from __future__ import annotations

import base64

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .spec import CeleryWorkerPool, ValueFrom
from .urls import UNSAFE, UNSAFE_IN_USERNAME, fits_raw_in_url, with_credentials


class SecretMissing(Exception):
    """A referenced Secret or key is not there (yet); the text names them, never a value."""


class SecretUnusable(SecretMissing):
    """A referenced value cannot be used as it is; the text says why, never the value."""


def broker_urls(core: client.CoreV1Api, pool: CeleryWorkerPool) -> tuple[str, str | None]:
    """(broker URL, management API URL or None) for a pool, reading Secrets where it refers to them."""
    broker = pool.spec.broker
    namespace = pool.metadata.namespace
    url = broker.url if broker.url is not None else _read(core, namespace, broker.url_from)
    if broker.username_from or broker.password_from:
        username = _credential(core, namespace, broker.username_from, username=True)
        password = _credential(core, namespace, broker.password_from, username=False)
        url = with_credentials(url, username, password)
    management = _read(core, namespace, broker.management_url_from) if broker.management_url_from else None
    return url, management


def _credential(core: client.CoreV1Api, namespace: str, source: ValueFrom | None, *, username: bool) -> str | None:
    """A user name or password from its Secret key, refused when the workers could not receive it
    intact inside their URL (see urls.py)."""
    if source is None:
        return None
    value = _read(core, namespace, source)
    if not fits_raw_in_url(value, username=username):  # which character is not said: it would tell of the value
        ref = source.secret_key_ref
        refused = "".join(sorted(UNSAFE_IN_USERNAME if username else UNSAFE))
        raise SecretUnusable(
            f"Secret {namespace}/{ref.name} key {ref.key!r}: a broker {'user name' if username else 'password'} "
            f"must not hold any of {refused}, spaces or control characters (the workers receive it inside "
            "their URL); use urlFrom with a percent-encoded URL instead"
        )
    return value


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
