"""Broker probes, one per broker URL: every pool on a broker shares its connection and caches, and
its pools are measured together (`CoalescingProbe`); on Redis the probe, the control app and the
event monitor share one command connection (`BrokerConnections`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import redis

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueProbe, QueueStats, Rates
from celery_worker_operator.brokers.coalesce import FRESH_SECONDS, CoalescingProbe
from celery_worker_operator.brokers.commands import CommandConnection
from celery_worker_operator.brokers.kombu_redis import COMMAND_POOL, REDIS_SCHEMES, kombu_tls, kombu_transport
from celery_worker_operator.brokers.rabbitmq import AMQP_SCHEMES, RabbitMQProbe
from celery_worker_operator.brokers.redis import KeyLayout, RedisProbe, command_pool
from celery_worker_operator.redact import redact
from celery_worker_operator.spec import TransportOptions

__all__ = [
    "FRESH_SECONDS",
    "BrokerAuthFailed",
    "BrokerConnections",
    "BrokerUnavailable",
    "CommandConnection",
    "ProbeRegistry",
    "QueueProbe",
    "QueueStats",
    "Rates",
    "kombu_tls",
    "kombu_transport",
    "open_probe",
]

PROBE_TIMEOUT = 5.0  # seconds a probe's command may take

Opener = Callable[[str, str | None, TransportOptions | None], QueueProbe]


class BrokerConnections:
    """The connections every part of the operator shares per broker URL: one for commands (the probe,
    the control broadcasts; on Redis also the event monitor's kombu commands), beside which the event
    stream keeps one of its own. Released with the broker's last pool."""

    def __init__(self, timeout: float = PROBE_TIMEOUT) -> None:
        self._timeout = timeout
        self._pools: dict[str, redis.ConnectionPool] = {}
        self._commands: dict[str, CommandConnection] = {}
        self._lock = threading.RLock()

    def redis_pool(self, url: str, master_name: str | None = None) -> redis.ConnectionPool:
        """The command connection's pool of Redis broker `url`, made on first use."""
        with self._lock:
            if url not in self._pools:
                self._pools[url] = command_pool(url, master_name, self._timeout)
            return self._pools[url]

    def kombu_options(self, url: str, transport_options: TransportOptions | None) -> dict[str, Any]:
        """Celery's broker_transport_options for an app of the operator on `url`: the pool's own, and
        on Redis the shared command pool (for `kombu_transport(url)`, which reads it)."""
        options = transport_options.as_celery() if transport_options else {}
        if urlsplit(url).scheme.lower() not in REDIS_SCHEMES:
            return options
        master_name = transport_options.master_name if transport_options else None
        return {**options, COMMAND_POOL: self.redis_pool(url, master_name)}

    def commands(self, url: str, celery_options: Mapping[str, Any]) -> CommandConnection:
        """The kombu command connection of `url`, made on first use with these transport options
        (`kombu_options`)."""
        with self._lock:
            if url not in self._commands:
                self._commands[url] = CommandConnection(url, celery_options)
            return self._commands[url]

    def release(self, url: str) -> None:
        """Close the connections of `url` (its last pool is gone); a later use opens new ones."""
        with self._lock:
            commands, pool = self._commands.pop(url, None), self._pools.pop(url, None)
        _close(commands, pool)

    def close(self) -> None:
        with self._lock:
            urls = {*self._commands, *self._pools}
        for url in urls:
            self.release(url)


def _close(commands: CommandConnection | None, pool: redis.ConnectionPool | None) -> None:
    if commands is not None:
        commands.close()
    if pool is not None:
        pool.disconnect()


def open_probe(
    url: str,
    management_url: str | None = None,
    transport_options: TransportOptions | None = None,
    connections: BrokerConnections | None = None,
) -> QueueProbe:
    """The probe for `url`'s broker, reading it as an app with these transport options writes it; on
    Redis on the command connection of `connections` when given.

    Connects lazily: an unreachable broker fails `stats`, not this.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        if management_url:
            raise ValueError(f"a management API applies to RabbitMQ only, not {redact(url)}")
        master_name = transport_options.master_name if transport_options else None
        pool = connections.redis_pool(url, master_name) if connections else None
        return RedisProbe(url, layout=KeyLayout.of(transport_options), master_name=master_name, pool=pool)
    if scheme in AMQP_SCHEMES:
        commands = connections.commands(url, connections.kombu_options(url, transport_options)) if connections else None
        return RabbitMQProbe(url, management_url=management_url, commands=commands)
    raise ValueError(f"unsupported broker URL {redact(url)}: expected redis, rediss, sentinel, amqp, amqps or pyamqp")


class ProbeRegistry:
    """Hands out one probe per (broker URL, management URL, transport options), shared by all pools
    that use it, which measures their queues together."""

    def __init__(self, opener: Opener | None = None, connections: BrokerConnections | None = None) -> None:
        self._opener = opener or partial(open_probe, connections=connections)
        self._probes: dict[tuple[str, str | None, TransportOptions | None], CoalescingProbe] = {}
        self._lock = threading.Lock()

    def probe(
        self, url: str, management_url: str | None = None, transport_options: TransportOptions | None = None
    ) -> QueueProbe:
        key = (url, management_url, transport_options)
        with self._lock:
            if key not in self._probes:
                self._probes[key] = CoalescingProbe(self._opener(url, management_url, transport_options))
            return self._probes[key]

    def release(
        self, url: str, management_url: str | None = None, transport_options: TransportOptions | None = None
    ) -> None:
        """Close the probe of these arguments (its last pool is gone); a later `probe` opens a new one."""
        with self._lock:
            probe = self._probes.pop((url, management_url, transport_options), None)
        if probe is not None:
            probe.close()

    def close(self) -> None:
        """Close every probe (operator shutdown); the registry can hand out fresh ones afterwards."""
        with self._lock:
            probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.close()
