"""Passwords never reach a person: URL redaction, and the text of broker errors."""

from __future__ import annotations

import pytest

from celery_worker_operator.brokers import BrokerAuthFailed, BrokerUnavailable
from celery_worker_operator.redact import redact, url_secrets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:pw@h:6380/2?ssl_cert_reqs=required", "rediss://user:***@h:6380/2?ssl_cert_reqs=required"),
        ("amqp://u:p@ss@h:5672//", "amqp://u:***@h:5672//"),  # an unescaped @ in the password
        ("amqp://u:p%40ss@h//", "amqp://u:***@h//"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        (
            "error at amqp://u:a@h1// then http://g:b@h2:15672/api",
            "error at amqp://u:***@h1// then http://g:***@h2:15672/api",
        ),
        ("amqp://guest@h// and redis://h:6379", "amqp://guest@h// and redis://h:6379"),  # nothing to hide
        ("redis://:@h/0", "redis://:@h/0"),
        ("no url here", "no url here"),
    ],
)
def test_redact_masks_url_passwords(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_redact_masks_given_secrets_raw_and_encoded() -> None:
    assert redact("login p@ss failed (p%40ss)", ["p@ss"]) == "login *** failed (***)"


@pytest.mark.parametrize(
    ("url", "secrets"),
    [("amqp://u:p%40ss@h//", ["p@ss"]), ("redis://h/0?password=x%2By", ["x+y"]), ("redis://h:6379/0", [])],
)
def test_url_secrets_are_decoded(url: str, secrets: list[str]) -> None:
    assert url_secrets(url) == secrets


def test_broker_errors_carry_no_password() -> None:
    error = BrokerAuthFailed(
        "amqp://app:hunter2@rabbit:5672/prod", "server said: password hunter2 rejected", ["hunter2"]
    )
    assert isinstance(error, BrokerUnavailable)
    for text in (str(error), repr(error), error.url, error.reason):
        assert "hunter2" not in text
    assert "amqp://app:***@rabbit:5672/prod" in str(error)
