"""The I/O edge of telemetry: one daemon thread per broker URL consuming Celery's event stream.

A plain kombu consumer on the `celeryev` exchange decodes JSON and unbatches the workers'
`task.multi` messages itself (celery's `Receiver` + `State` keeps every task as an object and
tops out near 15-17k events/s on batched streams, 3,600 unbatched), then folds them into an
`EventAggregator`. It wakes the workers on every (re)connect so they announce themselves at once,
and reconnects with backoff after broker loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from celery import Celery
from celery.events.event import get_exchange
from kombu.entity import Queue
from kombu.messaging import Consumer

from ..brokers import kombu_tls, kombu_transport
from ..brokers.commands import CLIENT_NAME, named
from ..control.conversation import OperatorControl, broadcast
from ..redact import redact, url_secrets
from .aggregator import EventAggregator, unbatch
from .model import PoolTelemetry

log = logging.getLogger(__name__)

RETRY_MIN, RETRY_MAX = 0.5, 5.0  # reconnect backoff: quick after a blip, never hammering a dead broker
AMQP_HEARTBEAT = 10.0  # notices a silently dead RabbitMQ connection within ~20 s
DRAIN_TIMEOUT = 1.0  # how often the consumer looks at the stop flag when no event arrives
QUEUE_EXPIRES = 60.0  # an orphaned event queue (operator killed) vanishes from RabbitMQ after this


class EventMonitor:
    """Watches one broker's Celery event stream in a daemon thread; `snapshot` never blocks on I/O.

    Call `start()` once, `snapshot(pool, queues)` as often as needed, `stop()` at shutdown. The
    consumer's queue has Celery's 5 s message TTL by default, so a stalled monitor loses old
    events instead of piling them up on RabbitMQ.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        transport_options: Mapping[str, Any] | None = None,
        window: float = 60.0,
        exchange: str = "celeryev",
        queue_ttl: float | None = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker_url = broker_url
        self.name = redact(broker_url)  # for logs, the thread name and status: never the password
        self._aggregator = EventAggregator(window=window)
        self._app = Celery(set_as_current=False, broker=broker_url, control=OperatorControl)
        self._app.conf.event_exchange = exchange
        self._app.conf.broker_transport = kombu_transport(broker_url)  # on Redis: commands on the shared connection
        self._app.conf.broker_use_ssl = kombu_tls(broker_url)
        # as the workers send (on Redis with the shared command connection), and named on the broker
        self._app.conf.broker_transport_options = {**(transport_options or {}), **named(f"{CLIENT_NAME}-events")}
        self._queue_ttl = queue_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._retry = RETRY_MIN
        self._thread = threading.Thread(target=self._run, name=f"celery-events {self.name}", daemon=True)
        self.events = 0  # events consumed; a counter for status and the benchmark
        self.dropped = 0  # events or messages that could not be read
        self.connects = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> EventMonitor:
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        """True once subscribed (and the workers woken); for start-up checks and tests."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop consuming; the stream's connection (its wakeup broadcasts' too) closes as the thread ends."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self, pool: str, queues: Sequence[str] = (), claim: Collection[str] = ()) -> PoolTelemetry:
        """The numbers of pool `pool` (a `PoolIdentity.key`), see `EventAggregator.snapshot`."""
        with self._lock:
            return self._aggregator.snapshot(pool, self._clock(), queues, claim)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._consume()
            except Exception as error:  # whatever broke the connection, the answer is to reconnect
                self._connected.clear()
                self.last_error = redact(f"{type(error).__name__}: {error}", url_secrets(self.broker_url))
                log.warning(
                    "celery events from %s lost: %s; retrying in %.1f s", self.name, self.last_error, self._retry
                )
                self._stopping.wait(self._retry)
                self._retry = min(self._retry * 2, RETRY_MAX)
        self._connected.clear()

    def _consume(self) -> None:
        with self._app.connection_for_read(heartbeat=AMQP_HEARTBEAT) as connection, connection.channel() as channel:
            queue = Queue(  # type: ignore[no-untyped-call]
                f"celeryev.operator.{uuid.uuid4().hex}",
                get_exchange(connection, self._app.conf.event_exchange),
                routing_key="#",
                auto_delete=True,
                durable=False,
                message_ttl=self._queue_ttl,
                expires=QUEUE_EXPIRES,
            )
            consumer = Consumer(  # type: ignore[no-untyped-call]
                channel, queues=[queue], no_ack=True, accept=["json"], on_message=self._on_message
            )
            with consumer:
                self._wakeup(connection)
                self._on_connected()
                self._drain(connection)

    def _wakeup(self, connection: Any) -> None:
        """Ask every worker for a heartbeat now (celery's `wakeup=True`), once we can hear the answers.

        kombu's Redis transport subscribes to the fanout channel only inside the first
        `drain_events`; broadcasting before that (as celery's Receiver does) loses the replies
        of the workers that answer first, and a worker with a long heartbeat interval stays unseen.
        """
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.05)
        broadcast(self._app, lambda: contextlib.nullcontext(connection), "heartbeat", {}, timeout=1.0, reply=False)

    def _on_connected(self) -> None:
        with self._lock:
            self._aggregator.observe_from(self._clock())
        self.connects += 1
        self._retry = RETRY_MIN
        self._connected.set()
        log.info("watching celery events on %s", self.name)

    def _drain(self, connection: Any) -> None:
        """Deliver events until stopped; AMQP heartbeats are ours to send, even while busy."""
        due = time.monotonic()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):  # socket.timeout is an alias
                connection.drain_events(timeout=DRAIN_TIMEOUT)
            if time.monotonic() >= due:
                connection.heartbeat_check()
                due = time.monotonic() + 1.0

    def _on_message(self, message: Any) -> None:
        try:
            body = json.loads(message.body) if message.content_type == "application/json" else message.decode()
            events = unbatch(body)
        except Exception as error:  # a foreign or corrupt message must not stop the stream
            self.dropped += 1
            log.debug("unreadable event message on %s: %s", self.name, error)
            return
        now = self._clock()
        with self._lock:
            self.dropped += self._aggregator.feed_many(events, now)
            self.events += len(events)


class TelemetryMonitors:
    """One `EventMonitor` per broker URL, started on first use and shared by every pool on it."""

    def __init__(self, *, window: float = 60.0, exchange: str = "celeryev") -> None:
        self._window, self._exchange = window, exchange
        self._monitors: dict[str, EventMonitor] = {}
        self._lock = threading.Lock()

    def monitor(self, broker_url: str, transport_options: Mapping[str, Any] | None = None) -> EventMonitor:
        """The monitor of `broker_url`, started with these transport options on first use."""
        with self._lock:
            monitor = self._monitors.get(broker_url)
            if monitor is None:
                monitor = EventMonitor(
                    broker_url, transport_options=transport_options, window=self._window, exchange=self._exchange
                ).start()
                self._monitors[broker_url] = monitor
            return monitor

    def snapshot(self, broker_url: str, pool: str, queues: Sequence[str] = ()) -> PoolTelemetry:
        return self.monitor(broker_url).snapshot(pool, queues)

    def release(self, broker_url: str) -> None:
        """Stop the monitor of `broker_url` (its last pool is gone); a later `monitor` starts a new one."""
        with self._lock:
            monitor = self._monitors.pop(broker_url, None)
        if monitor is not None:
            monitor.stop()

    def stop(self) -> None:
        with self._lock:
            monitors, self._monitors = list(self._monitors.values()), {}
        for monitor in monitors:
            monitor.stop()
