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
import time
from collections.abc import Callable
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


SECRET_MAX_AGE = 10.0  # a Secret read this recently answers again: a rotation is seen within it


class SecretCache:
    """Secrets' data as read at most `max_age` seconds ago. Every pass of every pool resolves its
    broker Secret, and hundreds of pools often share a few: each is read once per `max_age`, not once
    per pool and pass. A Secret not found is asked for again every time."""

    def __init__(
        self, core: client.CoreV1Api, max_age: float = SECRET_MAX_AGE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._core, self._max_age, self._clock = core, max_age, clock
        self._read: dict[tuple[str, str], tuple[float, dict[str, bytes | str]]] = {}
        self._lock = threading.Lock()

    def data(self, namespace: str, name: str) -> dict[str, bytes | str]:
        """The Secret's `data` (base64 values); ApiException (404: not found) as the API raises it."""
        with self._lock:  # held while reading: the pools that find it stale together read it once
            now = self._clock()
            read = self._read.get((namespace, name))
            if read is not None and now - read[0] < self._max_age:
                return read[1]
            data = dict(self._core.read_namespaced_secret(name, namespace).data or {})
            self._read = {key: kept for key, kept in self._read.items() if now - kept[0] < self._max_age}
            self._read[(namespace, name)] = (now, data)
            return data


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


def broker_urls(secrets: SecretCache, pool: CeleryWorkerPool, pem_files: PemFiles) -> tuple[str, str | None]:
    """(broker URL, management API URL or None) for a pool, reading Secrets where it refers to them."""
    broker = pool.spec.broker
    namespace = pool.metadata.namespace
    url = broker.url if broker.url is not None else _read(secrets, namespace, broker.url_from)
    if broker.username_from or broker.password_from:
        username = _credential(secrets, namespace, broker.username_from, username=True)
        password = _credential(secrets, namespace, broker.password_from, username=False)
        url = with_credentials(url, username, password)
    if broker.tls is not None:
        files = _tls_files(secrets, namespace, broker.tls, pem_files)
        url = with_tls(_tls_ready(url, broker.url_from, namespace), files)
    management = _read(secrets, namespace, broker.management_url_from) if broker.management_url_from else None
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


def _tls_files(secrets: SecretCache, namespace: str, tls: BrokerTLS, pem_files: PemFiles) -> dict[str, str]:
    def file(source: ValueFrom | None) -> str | None:
        return None if source is None else pem_files.path(_read_bytes(secrets, namespace, source))

    return tls_settings(file(tls.ca_from), file(tls.cert_from), file(tls.key_from))


def _credential(secrets: SecretCache, namespace: str, source: ValueFrom | None, *, username: bool) -> str | None:
    """A user name or password from its Secret key, refused when the workers could not receive it
    intact inside their URL (see urls.py)."""
    if source is None:
        return None
    value = _read(secrets, namespace, source)
    if not fits_raw_in_url(value, username=username):  # which character is not said: it would tell of the value
        ref = source.secret_key_ref
        refused = "".join(sorted(UNSAFE_IN_USERNAME if username else UNSAFE))
        raise SecretUnusable(
            f"Secret {namespace}/{ref.name} key {ref.key!r}: a broker {'user name' if username else 'password'} "
            f"must not hold any of {refused}, spaces, control characters or look-alikes of /?#@: (the workers "
            "receive it inside their URL); use urlFrom with a percent-encoded URL instead"
        )
    return value


def _read(secrets: SecretCache, namespace: str, source: ValueFrom | None) -> str:
    return _read_bytes(secrets, namespace, source).decode()


def _read_bytes(secrets: SecretCache, namespace: str, source: ValueFrom | None) -> bytes:
    assert source is not None
    ref = source.secret_key_ref
    try:
        data = secrets.data(namespace, ref.name)
    except ApiException as error:
        if error.status == 404:
            raise SecretMissing(f"Secret {namespace}/{ref.name} not found") from None
        raise
    if ref.key not in data:
        raise SecretMissing(f"Secret {namespace}/{ref.name} has no key {ref.key!r}") from None
    return base64.b64decode(data[ref.key])
