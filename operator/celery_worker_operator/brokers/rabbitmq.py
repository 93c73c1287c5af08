"""RabbitMQ probe: ready and consumer counts over AMQP, the rest from the management API when given.

A passive `queue_declare` answers with ready messages and consumers only, and it is real-time.
Prefetched (unacked) counts, rates and the head message's `timestamp` exist only in the management
API, whose statistics lag by its collection interval (5 s by default).
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import (
    AMQPConnectionError,
    AMQPError,
    AuthenticationError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueStats, Rates
from celery_worker_operator.redact import url_secrets

AMQP_SCHEMES = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671}
ACCESS_REFUSED = 403
NOT_FOUND = 404
_COLUMNS = ",".join(
    [
        "name",
        "messages_unacknowledged",
        "head_message_timestamp",
        "message_stats.publish_details.rate",
        "message_stats.deliver_get_details.rate",
        "message_stats.ack_details.rate",
    ]
)
_AUTH_ERRORS = (AuthenticationError, ProbableAuthenticationError, ProbableAccessDeniedError)


@dataclass(frozen=True)
class AmqpTarget:
    """Where and as whom to connect, read the way kombu reads a Celery broker URL."""

    host: str
    port: int
    vhost: str
    username: str
    password: str
    tls: bool


def parse_amqp_url(url: str) -> AmqpTarget:
    """kombu's reading: path `//` or `/%2F` is vhost `/`, `/name` is `name`, no path is `/`; guest/guest."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in AMQP_SCHEMES:
        raise ValueError(f"not an AMQP URL scheme: {scheme!r}")
    return AmqpTarget(
        host=parts.hostname or "localhost",
        port=parts.port or AMQP_SCHEMES[scheme],
        vhost=unquote(parts.path[1:]) or "/",
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        tls=scheme == "amqps",
    )


def connection_parameters(target: AmqpTarget, timeout: float) -> pika.ConnectionParameters:
    """pika parameters for `target` (built directly: pika's own URL parser reads `//` as vhost '')."""
    tls = pika.SSLOptions(ssl.create_default_context(), target.host) if target.tls else None
    return pika.ConnectionParameters(
        host=target.host,
        port=target.port,
        virtual_host=target.vhost,
        credentials=pika.PlainCredentials(target.username, target.password),
        ssl_options=tls,
        connection_attempts=1,
        socket_timeout=timeout,
        stack_timeout=timeout,
        blocked_connection_timeout=timeout,
    )


@dataclass(frozen=True)
class ManagementRow:
    """What the management API adds to a queue's numbers."""

    unacked: int
    head_timestamp: float | None
    rates: Rates


def management_rows(payload: Iterable[Mapping[str, Any]]) -> dict[str, ManagementRow]:
    """Rows of GET /api/queues/{vhost} by queue name; a queue without statistics yet is left out."""
    rows = {}
    for queue in payload:
        if "messages_unacknowledged" not in queue:
            continue
        stats = queue.get("message_stats") or {}
        rates = Rates(
            *(float((stats.get(f"{k}_details") or {}).get("rate", 0.0)) for k in ("publish", "deliver_get", "ack"))
        )
        stamp = queue.get("head_message_timestamp")
        rows[queue["name"]] = ManagementRow(
            int(queue["messages_unacknowledged"]), float(stamp) if stamp else None, rates
        )
    return rows


def queue_stats(name: str, declared: tuple[int, int] | None, row: ManagementRow | None, now: float) -> QueueStats:
    """Merge the AMQP answer (ready, consumers; None = no such queue) with the management row."""
    if declared is None:
        return QueueStats(name, depth=0, reserved=0, consumers=0, oldest_age_seconds=0.0, exists=False)
    ready, consumers = declared
    if ready == 0:
        age: float | None = 0.0
    elif row is not None and row.head_timestamp is not None:
        age = max(0.0, now - row.head_timestamp)
    else:
        age = None
    return QueueStats(
        name,
        depth=ready,
        reserved=row.unacked if row else None,
        consumers=consumers,
        oldest_age_seconds=age,
        rates=row.rates if row else None,
    )


class Management:
    """The RabbitMQ management HTTP API, one request per poll for all queues of a vhost."""

    def __init__(self, url: str, vhost: str, timeout: float) -> None:
        parts = urlsplit(url)
        netloc = parts.hostname or "localhost"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._url = url
        self._endpoint = f"{base}/api/queues/{quote(vhost, safe='')}?columns={_COLUMNS}"
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        self._authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        self._timeout = timeout

    def queues(self) -> dict[str, ManagementRow]:
        request = urllib.request.Request(self._endpoint, headers={"Authorization": self._authorization})
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return management_rows(json.load(response))
        except urllib.error.HTTPError as error:
            kind = BrokerAuthFailed if error.code == 401 else BrokerUnavailable
            raise kind(
                self._url, f"management API answered HTTP {error.code} {error.reason}", url_secrets(self._url)
            ) from None
        except (OSError, ValueError) as error:
            raise BrokerUnavailable(self._url, f"management API: {error}", url_secrets(self._url)) from None


class RabbitMQProbe:
    """QueueProbe for Celery on RabbitMQ (`amqp://`, `amqps://`, vhosts), optionally with management."""

    def __init__(
        self,
        url: str,
        *,
        management_url: str | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._target = parse_amqp_url(url)
        self._parameters = connection_parameters(self._target, timeout)
        self._management = Management(management_url, self._target.vhost, timeout) if management_url else None
        self._clock = clock
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._open_channel: BlockingChannel | None = None

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        names = list(dict.fromkeys(queues))
        with self._lock:
            try:
                declared = self._declared(names)
            except (AMQPError, OSError) as error:
                self._drop()
                raise self._unavailable(error) from None
            rows = self._management.queues() if self._management else {}
        now = self._clock()
        return {name: queue_stats(name, declared[name], rows.get(name), now) for name in names}

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _declared(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        """Passive declares; a connection kept since the last poll may have died quietly, so retry once."""
        kept = self._connection is not None
        try:
            return self._declare(names)
        except AMQPConnectionError:
            self._drop()
            if not kept:
                raise
            return self._declare(names)

    def _declare(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        channel = self._channel()
        declared: dict[str, tuple[int, int] | None] = {}
        for name in names:
            try:
                method = channel.queue_declare(name, passive=True).method
                declared[name] = (method.message_count, method.consumer_count)
            except ChannelClosedByBroker as closed:
                if closed.reply_code != NOT_FOUND:
                    raise
                declared[name] = None
                channel = self._channel()  # the broker closes the channel of a failed declare
        return declared

    def _channel(self) -> BlockingChannel:
        """The kept channel, or a new one when the broker closed it (after a failed declare): a
        channel opened per poll and never closed would pile up to the broker's channel_max."""
        if self._connection is None or not self._connection.is_open:
            self._connection = pika.BlockingConnection(self._parameters)
        if self._open_channel is None or not self._open_channel.is_open:
            self._open_channel = self._connection.channel()
        return self._open_channel

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(AMQPError, OSError):  # discarded because it failed; nothing to save
                connection.close()

    def _unavailable(self, error: BaseException) -> BrokerUnavailable:
        reason = str(error) if isinstance(error, OSError) else repr(error)  # pika's str() is often empty
        secrets = [self._target.password]
        refused = isinstance(error, _AUTH_ERRORS) or (
            isinstance(error, ConnectionClosedByBroker | ChannelClosedByBroker) and error.reply_code == ACCESS_REFUSED
        )
        if refused:
            reason = f"RabbitMQ refused user {self._target.username!r} on vhost {self._target.vhost!r} ({reason})"
            return BrokerAuthFailed(self._url, reason, secrets)
        return BrokerUnavailable(self._url, reason, secrets)
