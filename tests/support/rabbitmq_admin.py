"""RabbitMQ management API calls tests need: throwaway users, and deleting test queues.

Tests share one RabbitMQ, so every user and queue they create has a unique name and is removed.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pika


def management_call(management_url: str, method: str, path: str, body: Any = None) -> Any:
    """`method` `path` on the management API, as the admin user in `management_url`; the JSON answer, if any."""
    parts = urlsplit(management_url)
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.hostname}:{parts.port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Basic " + base64.b64encode(credentials).decode(),
            "content-type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


def grant_everything(management_url: str, vhost: str, user: str) -> None:
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    management_call(
        management_url, "PUT", f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}", everything
    )


@contextmanager
def temporary_vhost(management_url: str) -> Iterator[str]:
    """A fresh vhost (a broker of its own, to kombu) with full rights for the admin user of
    `management_url`, deleted with all it holds afterwards."""
    vhost = f"cwo-test-{uuid.uuid4().hex[:12]}"
    admin = unquote(urlsplit(management_url).username or "guest")
    management_call(management_url, "PUT", f"/api/vhosts/{vhost}")
    try:
        grant_everything(management_url, vhost, admin)
        yield vhost
    finally:
        management_call(management_url, "DELETE", f"/api/vhosts/{vhost}")


@dataclass(frozen=True)
class TempUser:
    name: str
    password: str


@contextmanager
def temporary_user(management_url: str, vhost: str = "/") -> Iterator[TempUser]:
    """A user with a random password and full rights on `vhost`, deleted afterwards."""
    user = TempUser(f"cwo-test-{uuid.uuid4().hex[:12]}", secrets.token_urlsafe(16))
    management_call(management_url, "PUT", f"/api/users/{user.name}", {"password": user.password, "tags": ""})
    try:
        grant_everything(management_url, vhost, user.name)
        yield user
    finally:
        management_call(management_url, "DELETE", f"/api/users/{user.name}")


def delete_queues(amqp_url: str, names: Iterable[str]) -> None:
    """Delete test queues (a missing one is fine) over AMQP as the admin user in `amqp_url`."""
    parts = urlsplit(amqp_url)
    credentials = pika.PlainCredentials(unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(parts.hostname, parts.port or 5672, "/", credentials)
    )
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        connection.close()
