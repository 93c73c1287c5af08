"""One Celery control broadcast on a connection the caller holds: kombu's message, no connection of its own.

Celery's `app.control.broadcast` publishes through kombu's process-wide producer pool (a connection
per broker besides the app's) and waits for replies inside `drain_events`, which on Redis is a
BRPOP that keeps a connection for the app's life. Here the command is published by Celery's own
mailbox (its message format, clock and expiry headers) on the caller's channel, and the replies are
read from the mailbox's reply queue with `basic_get` (RPOP on Redis, basic.get on RabbitMQ), decoded
by kombu. The connection is used only to send and to read, so it can be the broker's one command
connection, which the probe uses between those steps (brokers/commands.py).

Celery names a reply queue after the thread and the `id()` of a short-lived mailbox copy, and makes
it exclusive (on RabbitMQ, owned by the connection that declared it): another app of the process
(a publisher, a test's client) can be handed the same name while our queue lives, and its declare
fails with RESOURCE_LOCKED (or ours does). Apps made with `control=OperatorControl` name each
conversation's reply queue with a fresh uuid, and the conversation deletes it when done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import cached_property
from typing import Any

from celery import Celery
from celery.app.control import Control
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.messaging import Producer
from kombu.pidbox import Mailbox
from kombu.utils.uuid import uuid

POLL_SECONDS = 0.05  # between reads of the reply queue while replies are awaited
Using = Callable[[], AbstractContextManager[Connection]]  # the connection, held for one step


class ConversationMailbox(Mailbox):
    """Celery's control mailbox whose every bound copy (one per conversation) has a reply queue of its own."""

    def __call__(self, connection: Connection) -> ConversationMailbox:
        bound: ConversationMailbox = super().__call__(connection)  # type: ignore[no-untyped-call]
        for cached in ("oid", "reply_queue"):
            bound.__dict__.pop(cached, None)
        return bound

    @cached_property
    def oid(self) -> str:
        return str(uuid())


class OperatorControl(Control):  # type: ignore[misc]
    """`Celery(control=OperatorControl)`: the operator's apps converse through `ConversationMailbox`."""

    Mailbox = ConversationMailbox


def broadcast(
    app: Celery,
    using: Using,
    command: str,
    arguments: Mapping[str, Any],
    destination: Sequence[str] | None = None,
    *,
    timeout: float,
    limit: int | None = None,
    reply: bool = True,
) -> list[dict[str, Any]]:
    """Send control `command` to `destination` (None: every worker) and return the replies that came
    within `timeout` seconds, at most `limit`, as Celery's `broadcast(reply=True)` does: one
    `{hostname: reply}` each. With `reply=False` only send. `using()` lends the connection (always the
    same kombu Connection) for each step, a publish or one read of the reply queue, not for the waits."""
    ticket = uuid() if reply else None
    with using() as connection:
        mailbox = app.control.mailbox(connection)  # bound once: a reply queue of its own
        replies = mailbox.reply_queue  # declared by `_publish`, deleted when done
        mailbox._publish(
            command,
            dict(arguments),
            destination=list(destination) if destination is not None else None,
            reply_ticket=ticket,
            channel=connection.default_channel,
            timeout=timeout,
            producer=Producer(connection.default_channel, auto_declare=False),  # type: ignore[no-untyped-call]
        )
    if ticket is None:
        return []
    try:
        return _collect(using, replies, mailbox.accept, ticket, timeout, limit)
    finally:
        with using() as connection:
            replies(connection.default_channel).delete()


def _collect(
    using: Using, replies: Queue, accept: Any, ticket: str, timeout: float, limit: int | None
) -> list[dict[str, Any]]:
    """The replies to `ticket`; replies to an earlier conversation that came too late are dropped."""
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while limit is None or len(answers) < limit:
        with using() as connection:
            message = replies(connection.default_channel).get(no_ack=True, accept=accept)  # type: ignore[no-untyped-call]
        if message is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
            continue
        expires = message.headers.get("expires")
        if message.headers.get("ticket", ticket) == ticket and not (expires and time.time() > expires):
            answers.append(message.payload)
    return answers
