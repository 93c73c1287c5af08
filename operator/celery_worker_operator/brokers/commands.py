"""A broker's one kombu connection for the operator's commands, taken in turns.

The control broadcasts of every pool on a broker and, on RabbitMQ, the probe's passive declares go
over this connection (on Redis the probe shares the command connection's redis-py pool instead:
kombu_redis.py). kombu's channels and py-amqp are not thread-safe, so each caller holds it for one
step (a publish, one read of a reply queue, one probe) and never while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from kombu.connection import Connection
from kombu.exceptions import KombuError

from celery_worker_operator.brokers.kombu_redis import kombu_tls, kombu_transport

CLIENT_NAME = "celery-worker-operator"  # how the connection shows on the broker (CLIENT LIST, RabbitMQ's connections)
CONNECT_TIMEOUT = 3.0  # with one reconnect, a dead broker fails a call in seconds; the next poll tries again
AMQP_SOCKET_TIMEOUT = 5.0  # a RabbitMQ that stops answering fails the call instead of blocking every pool on it


def named(name: str) -> dict[str, Any]:
    """Transport options that name a kombu connection `name` on the broker: Redis's CLIENT SETNAME
    (kombu's `client_name`), RabbitMQ's `connection_name` client property; each transport ignores the other's."""
    return {"client_name": name, "client_properties": {"connection_name": name}}


class CommandConnection:
    """One broker's kombu connection for commands, used by one thread at a time (`using`)."""

    def __init__(self, url: str, transport_options: Mapping[str, Any]) -> None:
        # reconnect once per call, not forever
        options: dict[str, Any] = {**transport_options, **named(CLIENT_NAME), "max_retries": 1}
        if urlsplit(url).scheme.lower() in ("amqp", "amqps", "pyamqp"):
            options.update(read_timeout=AMQP_SOCKET_TIMEOUT, write_timeout=AMQP_SOCKET_TIMEOUT)
        self.connection = Connection(  # type: ignore[no-untyped-call]
            url,
            transport=kombu_transport(url),
            ssl=kombu_tls(url) or False,
            transport_options=options,
            connect_timeout=CONNECT_TIMEOUT,
        )
        self._lock = threading.Lock()

    @property
    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """What the client library raises when the connection is lost (reading does not connect)."""
        errors: tuple[type[BaseException], ...] = self.connection.connection_errors
        return errors

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """What kombu and the client library raise when the broker goes away or refuses a call (reading
        does not connect)."""
        return (KombuError, *self.connection_errors, *self.connection.channel_errors)

    @contextmanager
    def using(self) -> Iterator[Connection]:
        """The connection, for this thread alone; after a connection error it is dropped, and the next
        use connects again."""
        with self._lock:
            try:
                yield self.connection
            except self.connection_errors:
                self.connection.collect()  # type: ignore[no-untyped-call]
                raise

    def close(self) -> None:
        with self._lock:
            self.connection.release()  # type: ignore[no-untyped-call]
