"""kombu's Redis transport, with every command of the operator's Celery apps on one shared connection.

kombu gives each channel two connection pools of its own (commands; BRPOP and pub/sub), and the
control app, its producer pool and the event consumer each open channels: ten connections per Redis
URL. These channels take their commands from the pool in transport option `command_pool` (the
broker's one command connection, which the probe shares: see `BrokerConnections`), and only the
pub/sub subscription of the event stream keeps a connection of its own. A channel must then never
BRPOP (it would hold the shared connection): the operator reads control replies with `basic_get`
(control/conversation.py) and consumes only fanout queues (events), which kombu reads by pub/sub.
Without `command_pool` the channels are kombu's own.
"""

from __future__ import annotations

import ssl
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.transport import redis as kombu_redis

REDIS_SCHEMES = ("redis", "rediss", "sentinel")
COMMAND_POOL = "command_pool"  # the transport option that carries the shared pool


class _SharedCommands:
    """Mixin for kombu's Redis channels (placed before them): commands go through `command_pool`."""

    command_pool: redis.ConnectionPool | None = None

    def _get_pool(self, asynchronous: bool = False) -> redis.ConnectionPool:
        own: redis.ConnectionPool = super()._get_pool(asynchronous)  # type: ignore[misc]  # also sets the fanout prefix's db
        return own if self.command_pool is None else self.command_pool

    @cached_property
    def subclient(self) -> Any:
        """The pub/sub connection, from a pool of this channel's own: a subscription holds its connection."""
        self._subscription_pool = super()._get_pool(asynchronous=True)  # type: ignore[misc]
        return self.Client(connection_pool=self._subscription_pool).pubsub()  # type: ignore[attr-defined]

    def _disconnect_pools(self) -> None:
        """Close what is this channel's own; the shared pool closes with the broker's last pool."""
        if self.command_pool is not None:
            self._pool = self._async_pool = None
        subscription = self.__dict__.pop("_subscription_pool", None)
        if subscription is not None:
            subscription.disconnect()
        super()._disconnect_pools()  # type: ignore[misc]


class Channel(_SharedCommands, kombu_redis.Channel):
    """kombu's Redis channel on the shared command connection."""

    from_transport_options = (*kombu_redis.Channel.from_transport_options, COMMAND_POOL)  # type: ignore[assignment]


class SentinelChannel(_SharedCommands, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel on the shared command connection."""

    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, COMMAND_POOL)  # type: ignore[assignment]


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def kombu_tls(url: str) -> dict[str, Any] | None:
    """kombu's TLS settings (Celery's `broker_use_ssl`) for an app on `url` with our transport: a
    `rediss://` URL that sets no `ssl_*` parameters verifies the server, as redis-py does for the
    command connection (kombu would turn TLS on for that scheme only when it picks the transport
    itself); None leaves them to the URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "rediss" and "ssl_" not in parts.query:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def kombu_transport(url: str) -> type[kombu_redis.Transport] | None:
    """The transport class for a Celery app on `url` (Celery's `broker_transport`), None for kombu's default."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sentinel":
        return SentinelTransport
    return Transport if scheme in REDIS_SCHEMES else None
