"""What a broker probe reports, and how it fails: the contract between brokers and the control loop.

The control loop sizes pools from these numbers, so each field says exactly what it counts, and a
number the broker cannot give is `None` (unknown), never a guess of 0: the policy holds on unknowns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from celery_worker_operator.redact import redact


@dataclass(frozen=True)
class Rates:
    """Messages per second over the broker's own sampling window (RabbitMQ management API)."""

    publish: float
    deliver: float
    ack: float


@dataclass(frozen=True)
class QueueStats:
    """One queue, as the broker sees it at one moment.

    depth: messages waiting to be delivered (Redis: summed over the priority sub-lists).
    reserved: delivered to a worker but not acknowledged yet (prefetched); None when unknown.
    consumers: subscribed consumers; None where the broker does not know (Redis).
    oldest_age_seconds: how long the oldest waiting message has waited; 0.0 for an empty queue,
        None when it cannot be known. `oldest_age_is_lower_bound` means "at least this long".
    priorities: waiting messages per priority level, where the broker keeps levels apart (Redis).
    exists: False when the broker has no such queue (RabbitMQ); Redis has no queue objects.
    rates: broker-side rates, when a management API provides them.
    """

    name: str
    depth: int
    reserved: int | None
    consumers: int | None
    oldest_age_seconds: float | None
    priorities: Mapping[int, int] = field(default_factory=dict)
    oldest_age_is_lower_bound: bool = False
    exists: bool = True
    rates: Rates | None = None


class QueueProbe(Protocol):
    """Measures queues on one broker. Shared by every pool on that broker, so it must be thread-safe."""

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        """Numbers for each queue; raises BrokerUnavailable (only) when the broker cannot answer."""
        ...

    def close(self) -> None:
        """Release connections; a later `stats` call may reconnect."""
        ...


class BrokerUnavailable(Exception):
    """The broker could not be measured. Its text names the broker with every password masked."""

    def __init__(self, url: str, reason: str, secrets: Iterable[str] = ()) -> None:
        hidden = [s for s in secrets if s]
        self.url = redact(url, hidden)
        self.reason = redact(reason, hidden)
        super().__init__(f"broker {self.url} unavailable: {self.reason}")


class BrokerAuthFailed(BrokerUnavailable):
    """The broker refused the credentials or the vhost: retrying will not help until the Secret is fixed."""
