"""Broker probes, one per broker URL: every pool on a broker shares its connection and caches."""

from __future__ import annotations

import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from celery_worker_operator.brokers.base import BrokerAuthFailed, BrokerUnavailable, QueueProbe, QueueStats, Rates
from celery_worker_operator.brokers.rabbitmq import AMQP_SCHEMES, RabbitMQProbe
from celery_worker_operator.brokers.redis import RedisProbe
from celery_worker_operator.redact import redact

__all__ = [
    "BrokerAuthFailed",
    "BrokerUnavailable",
    "ProbeRegistry",
    "QueueProbe",
    "QueueStats",
    "Rates",
    "open_probe",
]

REDIS_SCHEMES = ("redis", "rediss")

Opener = Callable[[str, str | None], QueueProbe]


def open_probe(url: str, management_url: str | None = None) -> QueueProbe:
    """The probe for `url`'s broker. Connects lazily: an unreachable broker fails `stats`, not this."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        if management_url:
            raise ValueError(f"a management API applies to RabbitMQ only, not {redact(url)}")
        return RedisProbe(url)
    if scheme in AMQP_SCHEMES:
        return RabbitMQProbe(url, management_url=management_url)
    raise ValueError(f"unsupported broker URL {redact(url)}: expected redis, rediss, amqp, amqps or pyamqp")


class ProbeRegistry:
    """Hands out one probe per (broker URL, management URL), shared by all pools that use it."""

    def __init__(self, opener: Opener = open_probe) -> None:
        self._opener = opener
        self._probes: dict[tuple[str, str | None], QueueProbe] = {}
        self._lock = threading.Lock()

    def probe(self, url: str, management_url: str | None = None) -> QueueProbe:
        key = (url, management_url)
        with self._lock:
            if key not in self._probes:
                self._probes[key] = self._opener(url, management_url)
            return self._probes[key]

    def close(self) -> None:
        """Close every probe (operator shutdown); the registry can hand out fresh ones afterwards."""
        with self._lock:
            probes, self._probes = list(self._probes.values()), {}
        for probe in probes:
            probe.close()
