"""Broker URLs as the operator reads them: inline (no password), from a Secret's key, or an inline
URL completed with a user name and password from Secret keys; for a TLS broker, with the CA, client
certificate and key from Secret keys written to private files the URL points at."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .spec import BrokerTLS, CeleryWorkerPool, ValueFrom
from .urls import SSL_PARAMETER, UNSAFE, UNSAFE_IN_USERNAME, fits_raw_in_url, tls_settings, with_credentials, with_tls


class SecretMissing(Exception):
    """A referenced Secret or key is not there (yet); the text names them, never a value."""


class SecretUnusable(SecretMissing):
    """A referenced value cannot be used as it is; the text says why, never the value."""


class PemFiles:
    """The PEM files of the operator's own TLS connections, in a private directory (0700, files 0600).

    A file is named by its content's hash: an unchanged Secret gives the same path, so the broker URL
    (which keys the shared probe, event monitor and broadcasts) stays the same pass after pass, and a
    rotated one gives a new URL, hence fresh connections with the new files.
    """

    def __init__(self) -> None:
        self._directory: Path | None = None
        self._lock = threading.Lock()

    def path(self, content: bytes) -> str:
        """The path of a file holding `content`, written on first use."""
        with self._lock:
            if self._directory is None:
                self._directory = Path(tempfile.mkdtemp(prefix="celery-broker-tls-"))
            path = self._directory / f"{hashlib.sha256(content).hexdigest()[:32]}.pem"
            if not path.exists():
                partial = path.with_suffix(".partial")
                with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
                    out.write(content)
                os.replace(partial, path)  # whole or absent: a reader never sees half a key
            return str(path)

    def close(self) -> None:
        """Remove the files (operator shutdown)."""
        with self._lock:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None


def broker_urls(core: client.CoreV1Api, pool: CeleryWorkerPool, pem_files: PemFiles) -> tuple[str, str | None]:
    """(broker URL, management API URL or None) for a pool, reading Secrets where it refers to them."""
    broker = pool.spec.broker
    namespace = pool.metadata.namespace
    url = broker.url if broker.url is not None else _read(core, namespace, broker.url_from)
    if broker.username_from or broker.password_from:
        username = _credential(core, namespace, broker.username_from, username=True)
        password = _credential(core, namespace, broker.password_from, username=False)
        url = with_credentials(url, username, password)
    if broker.tls is not None:
        url = with_tls(_tls_ready(url, broker.url_from, namespace), _tls_files(core, namespace, broker.tls, pem_files))
    management = _read(core, namespace, broker.management_url_from) if broker.management_url_from else None
    return url, management


def _tls_ready(url: str, source: ValueFrom | None, namespace: str) -> str:
    """`url`, when tls can apply to it: a rediss:// URL that sets no TLS parameters itself. The spec's
    rules check an inline url; a URL from a Secret is checked here."""
    scheme = urlsplit(url).scheme.lower()
    if scheme != "rediss":
        problem = f"broker.tls needs a rediss:// URL, not {scheme}://"
    elif re.search(SSL_PARAMETER, url):
        problem = "the URL must not set ssl_* parameters when broker.tls sets them"
    else:
        return url
    where = f"Secret {namespace}/{source.secret_key_ref.name} key {source.secret_key_ref.key!r}: " if source else ""
    raise SecretUnusable(where + problem)


def _tls_files(core: client.CoreV1Api, namespace: str, tls: BrokerTLS, pem_files: PemFiles) -> dict[str, str]:
    def file(source: ValueFrom | None) -> str | None:
        return None if source is None else pem_files.path(_read_bytes(core, namespace, source))

    return tls_settings(file(tls.ca_from), file(tls.cert_from), file(tls.key_from))


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
    return _read_bytes(core, namespace, source).decode()


def _read_bytes(core: client.CoreV1Api, namespace: str, source: ValueFrom | None) -> bytes:
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
    return base64.b64decode(data[ref.key])
