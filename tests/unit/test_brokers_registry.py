"""One probe per broker URL, chosen by scheme; and the opt-in publish stamp."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
from celery.signals import before_task_publish

from celery_worker_operator import instrument
from celery_worker_operator.brokers import ProbeRegistry, QueueStats, open_probe
from celery_worker_operator.brokers.rabbitmq import RabbitMQProbe
from celery_worker_operator.brokers.redis import RedisProbe
from celery_worker_operator.instrument import published_at, uninstrument
from celery_worker_operator.spec import TransportOptions


class FakeProbe:
    def __init__(self) -> None:
        self.closed = False

    def stats(self, queues: Iterable[str]) -> dict[str, QueueStats]:
        return {name: QueueStats(name, 0, 0, None, 0.0) for name in queues}

    def close(self) -> None:
        self.closed = True


def test_registry_shares_one_probe_per_broker() -> None:
    opened: list[FakeProbe] = []

    def opener(url: str, management_url: str | None, options: TransportOptions | None) -> FakeProbe:
        opened.append(FakeProbe())
        return opened[-1]

    registry = ProbeRegistry(opener)
    first = registry.probe("redis://r:6379/0")
    assert registry.probe("redis://r:6379/0") is first
    assert registry.probe("redis://r:6379/1") is not first
    assert registry.probe("amqp://h//", "http://m:15672") is not registry.probe("amqp://h//")
    colon = TransportOptions(sep=":")
    assert registry.probe("redis://r:6379/0", None, colon) is not first, "another key layout, another probe"
    assert registry.probe("redis://r:6379/0", None, TransportOptions(sep=":")) is registry.probe(
        "redis://r:6379/0", None, colon
    )
    assert len(opened) == 5
    registry.close()
    assert all(probe.closed for probe in opened)
    assert registry.probe("redis://r:6379/0") is not first


@pytest.mark.parametrize(
    ("url", "kind"),
    [("redis://h:6379/0", RedisProbe), ("rediss://h:6380/0", RedisProbe), ("amqp://h//", RabbitMQProbe)],
)
def test_open_probe_by_scheme_without_connecting(url: str, kind: type) -> None:
    probe = open_probe(url)
    assert isinstance(probe, kind)
    probe.close()


@pytest.mark.parametrize(
    ("url", "management_url"), [("sqs://key:secret@", None), ("redis://:secret@h:6379/0", "http://m:15672")]
)
def test_open_probe_refuses_what_it_cannot_measure(url: str, management_url: str | None) -> None:
    with pytest.raises(ValueError) as caught:
        open_probe(url, management_url)
    assert "secret" not in str(caught.value)


@pytest.fixture
def stamping() -> Iterator[None]:
    instrument(object())
    yield
    uninstrument()


def test_instrument_stamps_header_and_amqp_timestamp(stamping: None) -> None:
    headers: dict[str, object] = {}
    properties: dict[str, object] = {}
    before_task_publish.send(sender="t", body=(), headers=headers, properties=properties)
    assert isinstance(headers["published_at"], float) and isinstance(properties["timestamp"], int)
    assert published_at(headers, properties) == headers["published_at"]


def test_uninstrument_stops_stamping() -> None:
    instrument(object())
    uninstrument()
    headers: dict[str, object] = {}
    before_task_publish.send(sender="t", body=(), headers=headers, properties={})
    assert headers == {}
