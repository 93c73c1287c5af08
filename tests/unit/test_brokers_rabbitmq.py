"""Pure parts of the RabbitMQ probe: kombu's URL reading, management rows, merging the two."""

from __future__ import annotations

from typing import Any

import pytest

from celery_worker_operator.brokers import QueueStats, Rates
from celery_worker_operator.brokers.rabbitmq import (
    AmqpTarget,
    ManagementRow,
    management_rows,
    parse_amqp_url,
    queue_stats,
)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("amqp://guest:guest@127.0.0.1:5672//", AmqpTarget("127.0.0.1", 5672, "/", "guest", "guest")),
        ("amqp://u:p%40ss@rabbit/%2F", AmqpTarget("rabbit", 5672, "/", "u", "p@ss")),
        ("pyamqp://u:p@rabbit:5673/prod", AmqpTarget("rabbit", 5673, "prod", "u", "p")),
        ("amqps://u:p@rabbit/prod%2Feu", AmqpTarget("rabbit", 5671, "prod/eu", "u", "p")),
        ("amqp://rabbit", AmqpTarget("rabbit", 5672, "/", "guest", "guest")),
        ("amqp://rabbit/", AmqpTarget("rabbit", 5672, "/", "guest", "guest")),
    ],
)
def test_urls_are_read_as_kombu_reads_them(url: str, target: AmqpTarget) -> None:
    assert parse_amqp_url(url) == target


def test_non_amqp_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="not an AMQP"):
        parse_amqp_url("redis://h:6379/0")


def test_management_rows() -> None:
    payload: list[dict[str, Any]] = [
        {
            "name": "busy",
            "messages_unacknowledged": 4,
            "head_message_timestamp": 1700000000,
            "message_stats": {"publish_details": {"rate": 2.5}, "ack_details": {"rate": 1.0}},
        },
        {"name": "idle", "messages_unacknowledged": 0},
        {"name": "fresh"},  # statistics not collected yet
    ]
    rows = management_rows(payload)
    assert rows == {
        "busy": ManagementRow(4, 1700000000.0, Rates(publish=2.5, deliver=0.0, ack=1.0)),
        "idle": ManagementRow(0, None, Rates(0.0, 0.0, 0.0)),
    }


ROW = ManagementRow(3, 1000.0, Rates(1.0, 2.0, 3.0))


@pytest.mark.parametrize(
    ("declared", "row", "expected"),
    [
        (None, ROW, QueueStats("q", 0, 0, 0, 0.0, exists=False)),
        ((5, 2), None, QueueStats("q", 5, None, 2, None)),
        ((5, 2), ROW, QueueStats("q", 5, 3, 2, 10.0, rates=ROW.rates)),
        ((0, 2), ROW, QueueStats("q", 0, 3, 2, 0.0, rates=ROW.rates)),
        ((5, 2), ManagementRow(3, None, ROW.rates), QueueStats("q", 5, 3, 2, None, rates=ROW.rates)),
    ],
)
def test_queue_stats_merge(declared: tuple[int, int] | None, row: ManagementRow | None, expected: QueueStats) -> None:
    assert queue_stats("q", declared, row, now=1010.0) == expected
