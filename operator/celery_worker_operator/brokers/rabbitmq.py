"""RabbitMQ probe: ready and consumer counts over AMQP, the rest from the management API when given.

The AMQP side is kombu's (py-amqp) connection that the control broadcasts of the broker use too
(`CommandConnection`): the operator keeps two connections per vhost, that one and the event stream's.

A passive `queue_declare` answers with ready messages and consumers only, and it is real-time.
Prefetched (unacked) counts, rates and the head message's `timestamp` exist only in the management
API, whose statistics lag by its collection interval (5 s by default).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from amqp.exceptions import AccessRefused, NotAllowed, NotFound
from kombu.connection import Connection

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueStats, Rates
from celery_worker_operator.brokers.commands import CommandConnection
from celery_worker_operator.redact import url_secrets

AMQP_SCHEMES = {"amqp": 5672, "pyamqp": 5672, "amqps": 5671}
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


@dataclass(frozen=True)
class AmqpTarget:
    """Where and as whom to connect, read the way kombu reads a Celery broker URL."""

    host: str
    port: int
    vhost: str
    username: str
    password: str


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
    """QueueProbe for Celery on RabbitMQ (`amqp://`, `amqps://`, vhosts), optionally with management;
    over the broker's command connection when given (shared with the control broadcasts), else one of its own."""

    def __init__(
        self,
        url: str,
        *,
        management_url: str | None = None,
        commands: CommandConnection | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = url
        self._target = parse_amqp_url(url)
        self._commands = commands or CommandConnection(url, {})
        self._own_connection = commands is None
        self._management = Management(management_url, self._target.vhost, timeout) if management_url else None
        self._clock = clock
        self._lock = threading.Lock()
        self._open_channel: Any = None  # the probe's own channel: a failed declare closes it, not the control's

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        names = list(dict.fromkeys(queues))
        failures: tuple[type[BaseException], ...] = (*self._commands.errors, OSError)
        with self._lock:
            try:
                declared = self._declared(names)
            except failures as error:
                raise self._unavailable(error) from None
            rows = self._management.queues() if self._management else {}
        now = self._clock()
        return {name: queue_stats(name, declared[name], rows.get(name), now) for name in names}

    def close(self) -> None:
        """Close the connection unless it is shared (its owner closes it)."""
        if self._own_connection:
            self._commands.close()

    def _declared(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        """Passive declares; a connection kept since the last poll may have died quietly, so retry once."""
        kept = self._commands.connection.connected
        try:
            return self._declare(names)
        except self._commands.connection_errors:
            if not kept:
                raise
            return self._declare(names)

    def _declare(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        declared: dict[str, tuple[int, int] | None] = {}
        with self._commands.using() as connection:
            channel = self._channel(connection)
            for name in names:
                try:
                    _, ready, consumers = channel.queue_declare(queue=name, passive=True)
                    declared[name] = (ready, consumers)
                except NotFound:
                    declared[name] = None
                    channel = self._channel(connection)  # the broker closes the channel of a failed declare
        return declared

    def _channel(self, connection: Connection) -> Any:
        """The kept channel, or a new one when the broker closed it (after a failed declare) or the
        connection is new: a channel opened per poll and never closed would pile up to channel_max."""
        channel = self._open_channel
        if channel is None or not channel.is_open or channel.connection is not connection.connection:
            connection.ensure_connection(max_retries=1, reraise_as_library_errors=False)  # type: ignore[no-untyped-call]
            self._open_channel = channel = connection.channel()  # type: ignore[no-untyped-call]
        return channel

    def _unavailable(self, error: BaseException) -> BrokerUnavailable:
        reason = f"{type(error).__name__}: {error}"
        secrets = [self._target.password]
        if isinstance(error, AccessRefused | NotAllowed):
            reason = f"RabbitMQ refused user {self._target.username!r} on vhost {self._target.vhost!r} ({reason})"
            return BrokerAuthFailed(self._url, reason, secrets)
        return BrokerUnavailable(self._url, reason, secrets)
