"""Broker probes, one per broker URL: every pool on a broker shares its connection and caches, and
its pools are measured together (`CoalescingProbe`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueProbe, QueueStats, Rates
from celery_worker_operator.brokers.coalesce import FRESH_SECONDS, CoalescingProbe
from celery_worker_operator.brokers.rabbitmq import AMQP_SCHEMES, RabbitMQProbe
from celery_worker_operator.brokers.redis import KeyLayout, RedisProbe
from celery_worker_operator.redact import redact
from celery_worker_operator.spec import TransportOptions

__all__ = [
    "FRESH_SECONDS",
    "BrokerAuthFailed",
    "BrokerUnavailable",
    "ProbeRegistry",
    "QueueProbe",
    "QueueStats",
    "Rates",
    "open_probe",
]

REDIS_SCHEMES = ("redis", "rediss", "sentinel")

Opener = Callable[[str, str | None, TransportOptions | None], QueueProbe]


def open_probe(
    url: str, management_url: str | None = None, transport_options: TransportOptions | None = None
) -> QueueProbe:
    """The probe for `url`'s broker, reading it as an app with these transport options writes it.

    Connects lazily: an unreachable broker fails `stats`, not this.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        if management_url:
            raise ValueError(f"a management API applies to RabbitMQ only, not {redact(url)}")
        master_name = transport_options.master_name if transport_options else None
        return RedisProbe(url, layout=KeyLayout.of(transport_options), master_name=master_name)
    if scheme in AMQP_SCHEMES:
        return RabbitMQProbe(url, management_url=management_url)
    raise ValueError(f"unsupported broker URL {redact(url)}: expected redis, rediss, sentinel, amqp, amqps or pyamqp")


class ProbeRegistry:
    """Hands out one probe per (broker URL, management URL, transport options), shared by all pools
    that use it, which measures their queues together."""

    def __init__(self, opener: Opener = open_probe) -> None:
        self._opener = opener
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
