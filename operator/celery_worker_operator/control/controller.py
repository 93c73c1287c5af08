"""The I/O edge of control: Celery's own control mailbox, one app per broker URL, shared by its pools.

One `converge` pass: ping to find the pool's workers (`<pool>.<namespace>@...`, naming.py), inspect what each has
(`active_queues`, `registered` with its limits), plan the difference (pure, `plan.py`), send it,
and read every reply. Discovery is the only broadcast without `destination=`, and it is a ping;
every other command names exactly the pool's workers, so other pools on the broker are never
touched. All commands sent are idempotent, so a worker that stays silent is asked again with a
doubled reply timeout, and reported as unreachable if it never answers.

Every broadcast goes over the broker's command connection (`BrokerConnections`, shared with the
probe), held only to send and to read replies (`conversation.broadcast`).
Calls block for up to a few reply timeouts: run `converge` in a worker thread from asyncio.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError

from ..brokers import BrokerConnections, CommandConnection
from ..naming import PoolIdentity, member_of
from ..redact import redact, url_secrets
from .conversation import OperatorControl, broadcast
from .plan import (
    Command,
    Condition,
    Defaults,
    Outcome,
    PoolSettings,
    WorkerSettings,
    WorkerStats,
    describe_shares,
    limits_condition,
    plan_convergence,
    validate,
)
from .wire import TASK_INFO, reply_error, worker_settings, worker_stats

log = logging.getLogger(__name__)

# The only commands this module ever sends: discovery, two inspections, and the four it manages.
COMMANDS = frozenset(
    {
        *("ping", "active_queues", "registered", "active", "stats", "conf"),
        *("rate_limit", "time_limit", "add_consumer", "cancel_consumer"),
    }
)
DRAIN_POLL_SECONDS = 0.5
BACKGROUND_PASSES = 4  # pools converged at the same time, off their sizing loops
DISCOVERY_MAX_AGE = 5.0  # one discovery ping serves every pool of a broker this long (a new worker waits at most this)


@dataclass(frozen=True)
class Mailbox:
    """Celery's control mailbox on one broker: the app holds its settings (exchange, serializer), and
    its broadcasts go over the broker's command connection."""

    app: Celery
    commands: CommandConnection

    def broadcast(
        self,
        command: str,
        arguments: Mapping[str, Any],
        destination: Sequence[str] | None = None,
        *,
        timeout: float,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        return broadcast(self.app, self.commands.using, command, arguments, destination, timeout=timeout, limit=limit)


@dataclass(frozen=True)
class ConvergeResult:
    """What one pass found and did; `condition` is the pool's `LimitsApplied` condition."""

    workers: tuple[str, ...]
    applied: tuple[Outcome, ...]  # (worker, command) the worker confirmed
    errors: tuple[Outcome, ...]  # (worker, message); worker None for a spec entry not sent
    unreachable: tuple[str, ...]
    condition: Condition
    stats: Mapping[str, WorkerStats] = field(default_factory=dict)  # the health of each worker that answered


class PoolController:
    """Keeps the workers of every pool converged to its `PoolSettings`, one `converge` per poll.

    Remembers, per pool, the limits tasks had before it changed them (`Defaults`), so that taking a
    limit out of the spec restores the code's own. Call `forget` when a pool is deleted, `close` at
    shutdown. Broadcasts go over the broker's command connection from `connections` (shared with the
    probe; closed by whoever made `connections`), or from connections of its own.
    """

    def __init__(
        self,
        *,
        reply_timeout: float = 1.0,
        attempts: int = 3,
        discovery_max_age: float = DISCOVERY_MAX_AGE,
        connections: BrokerConnections | None = None,
    ) -> None:
        self.reply_timeout, self.attempts, self.discovery_max_age = reply_timeout, attempts, discovery_max_age
        self._connections = connections or BrokerConnections()
        self._own_connections = connections is None
        self._mailboxes: dict[str, Mailbox] = {}
        self._transport_options: dict[str, dict[str, Any]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._defaults: dict[tuple[str, str], Defaults] = {}  # keyed by (broker URL, PoolIdentity.key)
        self._discovered: dict[tuple[str, str], frozenset[str]] = {}  # the pool's workers the last pass found
        self._restart_pending: dict[tuple[str, str], set[str]] = {}  # workers sent a time limit while running
        self._draining: dict[tuple[str, str], set[str]] = {}  # workers on their way out: not re-subscribed
        self._running: dict[tuple[str, str], Future[ConvergeResult]] = {}
        self._pinged: dict[str, tuple[float, frozenset[str]]] = {}  # broker -> (ping sent, who answered)
        self._finished: dict[tuple[str, str], ConvergeResult] = {}
        self._executor = ThreadPoolExecutor(max_workers=BACKGROUND_PASSES, thread_name_prefix="converge")
        self._guard = threading.Lock()

    def use_transport_options(self, broker_url: str, options: Mapping[str, Any]) -> None:
        """Celery's broker_transport_options for `broker_url` (a sentinel's master_name, a key prefix),
        as the workers use them, with `BrokerConnections.kombu_options`; they apply when the broker's
        command connection is made, on its first use."""
        with self._guard:
            self._transport_options.setdefault(broker_url, dict(options))

    def converge_in_background(
        self, broker_url: str, pool: PoolIdentity, desired: PoolSettings, members: Collection[str] = ()
    ) -> tuple[ConvergeResult | None, bool]:
        """Start a pass for `pool` unless one is under way; return the latest finished result and
        whether it is new since the last call. A sizing loop calls this so that a silent worker's
        retries (seconds) never delay a scaling decision."""
        key = (broker_url, pool.key)
        with self._guard:
            running = self._running.get(key)
            fresh = running is not None and running.done()
            if fresh:
                assert running is not None
                self._finished[key] = running.result()
            if running is None or running.done():
                self._running[key] = self._executor.submit(self.converge, broker_url, pool, desired, members)
            return self._finished.get(key), fresh

    def converge(
        self, broker_url: str, pool: PoolIdentity, desired: PoolSettings, members: Collection[str] = ()
    ) -> ConvergeResult:
        """One pass for `pool` on `broker_url`: never raises for broker or worker trouble, reports it.
        `members` are the pool's pods (or processes): their workers still under a legacy name are its too."""
        mailbox, lock = self._mailbox(broker_url)
        broker_errors: tuple[type[BaseException], ...] = (KombuError, OSError, *mailbox.commands.errors)
        try:
            with lock:  # one pass at a time per broker: they share what discovery found
                return self._converge(mailbox, broker_url, pool, desired, members)
        except broker_errors as error:
            message = redact(f"broker {broker_url}: {type(error).__name__}: {error}", url_secrets(broker_url))
            log.warning("limits of pool %s not converged: %s", pool, message)
            return ConvergeResult((), (), (), (), Condition("Unknown", "BrokerUnavailable", message))

    def drain(
        self, broker_url: str, pool: PoolIdentity, members: Sequence[str], queues: Sequence[str], timeout: float
    ) -> list[str]:
        """Stop the workers of `members` (pods or processes of `pool`) taking tasks (cancel their
        consumers) and wait, at most `timeout` seconds, until they run none: then removing them loses
        no work. Returns the members still busy.

        Drained workers are left out of later `converge` passes until they are gone, so the next
        pass does not subscribe them again."""
        mailbox, lock = self._mailbox(broker_url)
        key = (broker_url, pool.key)
        live = self._discovered.get(key, frozenset())
        workers = [pool.hostname_of(member, live) for member in members]
        self._draining.setdefault(key, set()).update(workers)
        with lock:
            for queue in queues:
                self._ask(mailbox, "cancel_consumer", {"queue": queue}, workers)
        deadline, busy = time.monotonic() + timeout, list(workers)
        while busy:
            with lock:
                active = self._ask(mailbox, "active", {}, busy)
            busy = [w for w in busy if w not in active or active[w]]  # silence is not idleness
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(DRAIN_POLL_SECONDS)
        return [member_of(worker) for worker in busy]

    def forget(self, broker_url: str, pool: PoolIdentity) -> None:
        """Drop what was learned about a pool's defaults (the pool is gone), once its pass under way,
        if any, has ended (it would write them again); a pass still queued is not run."""
        key = (broker_url, pool.key)
        with self._guard:
            running = self._running.get(key)
        _finish_or_cancel([running] if running is not None else [])
        with self._guard:
            for state in self._pool_state():
                state.pop(key, None)

    def release(self, broker_url: str) -> None:
        """Drop what was kept for `broker_url` (its last pool is gone) and close its connection unless
        shared; a pass under way on it finishes first (so that it does not open it again)."""
        with self._guard:
            running = [future for key, future in self._running.items() if key[0] == broker_url]
        _finish_or_cancel(running)
        with self._guard:
            self._mailboxes.pop(broker_url, None)
            self._locks.pop(broker_url, None)
            self._transport_options.pop(broker_url, None)
            self._pinged.pop(broker_url, None)
            for state in self._pool_state():
                for key in [key for key in state if key[0] == broker_url]:
                    del state[key]
        if self._own_connections:
            self._connections.release(broker_url)

    def close(self) -> None:
        """Finish the passes under way, then release every broker connection."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._guard:
            self._mailboxes, self._locks, self._pinged = {}, {}, {}
        if self._own_connections:
            self._connections.close()

    def _pool_state(self) -> tuple[dict[tuple[str, str], Any], ...]:
        """Everything kept per (broker URL, pool)."""
        return (
            self._defaults,
            self._discovered,
            self._restart_pending,
            self._draining,
            self._finished,
            self._running,
        )

    def _mailbox(self, broker_url: str) -> tuple[Mailbox, threading.Lock]:
        with self._guard:
            if broker_url not in self._mailboxes:
                commands = self._connections.commands(broker_url, self._transport_options.get(broker_url, {}))
                app = Celery("celery-worker-operator", broker=broker_url, set_as_current=False, control=OperatorControl)
                self._mailboxes[broker_url], self._locks[broker_url] = Mailbox(app, commands), threading.Lock()
            return self._mailboxes[broker_url], self._locks[broker_url]

    def _converge(
        self, mailbox: Mailbox, broker_url: str, pool: PoolIdentity, desired: PoolSettings, members: Collection[str]
    ) -> ConvergeResult:
        key = (broker_url, pool.key)
        valid, invalid = validate(desired)
        discovered = self._discover(mailbox, broker_url, pool, members)
        self._discovered[key] = frozenset(discovered)
        draining = self._draining.setdefault(key, set())
        draining.intersection_update(discovered)  # a drained worker that is gone is done
        workers = [w for w in discovered if w not in draining]
        observed, errors, silent = self._observe(mailbox, workers)
        plan = plan_convergence(valid, observed, self._defaults.get(key, Defaults()), live=workers)
        self._defaults[key] = plan.defaults
        confirmed, refused, unanswered = self._send(mailbox, plan.commands)
        applied = [Outcome(worker, str(command)) for worker, command in confirmed]
        errors = [*invalid, *errors, *plan.unknown, *refused]
        unreachable = sorted({*silent, *unanswered})
        for worker in unreachable:
            log.warning("worker %s of pool %s did not reply to control commands", worker, pool)
        pending = self._restart_pending.setdefault(key, set())
        pending.intersection_update(workers)  # a worker gone (or restarted under a new name) is done
        pending.update(worker for worker, command in confirmed if command.name == "time_limit")
        shares = describe_shares(valid.pool_rate_limits, plan.shares)
        condition = limits_condition(workers, errors, unreachable, pending, shares)
        health = self._health(mailbox, list(observed))
        return ConvergeResult(tuple(workers), tuple(applied), tuple(errors), tuple(unreachable), condition, health)

    def _health(self, mailbox: Mailbox, workers: Sequence[str]) -> dict[str, WorkerStats]:
        """`stats` and `conf` of the workers that answered this pass, for the advisor (asked once: a
        worker too slow for it is left out of this pass's advice, not retried)."""
        stats = self._ask(mailbox, "stats", {}, workers, attempts=1)
        conf = self._ask(mailbox, "conf", {"with_defaults": False}, list(stats), attempts=1)
        return {worker: worker_stats(stats[worker], conf.get(worker)) for worker in stats}

    def _discover(self, mailbox: Mailbox, broker_url: str, pool: PoolIdentity, members: Collection[str]) -> list[str]:
        """The pool's workers that answer a ping: the one broadcast without a destination.

        Its full reply timeout is waited for, since the number of workers is what we ask; so one ping
        answers for every pool of the broker for `discovery_max_age` seconds: passes on one broker
        take turns (the app's lock), and a ping each would make a broker's pools wait a reply
        timeout apiece. Called under the app's lock.
        """
        sent, hostnames = self._pinged.get(broker_url, (-math.inf, frozenset()))
        if time.monotonic() - sent >= self.discovery_max_age:
            sent = time.monotonic()
            replies = mailbox.broadcast("ping", {}, timeout=self.reply_timeout)
            hostnames = frozenset(hostname for reply in replies for hostname in reply)
            self._pinged[broker_url] = (sent, hostnames)
        return pool.workers(hostnames, members)

    def _observe(
        self, mailbox: Mailbox, workers: Sequence[str]
    ) -> tuple[dict[str, WorkerSettings], list[Outcome], list[str]]:
        """Each worker's queues and task limits; workers that stay silent are listed apart."""
        queues = self._ask(mailbox, "active_queues", {}, workers)
        tasks = self._ask(mailbox, "registered", {"taskinfoitems": list(TASK_INFO)}, list(queues))
        observed: dict[str, WorkerSettings] = {}
        errors: list[Outcome] = []
        for worker in tasks:
            try:
                observed[worker] = worker_settings(queues[worker], tasks[worker])
            except ValueError as error:
                errors.append(Outcome(worker, str(error)))
        return observed, errors, [w for w in workers if w not in tasks]

    def _send(
        self, mailbox: Mailbox, commands: Iterable[Command]
    ) -> tuple[list[tuple[str, Command]], list[Outcome], set[str]]:
        """Send each command to its workers; a worker silent once is not waited for again this pass."""
        applied: list[tuple[str, Command]] = []
        refused: list[Outcome] = []
        silent: set[str] = set()
        for command in commands:
            destination = [w for w in command.destination if w not in silent]
            replies = self._ask(mailbox, command.name, command.arguments, destination)
            for worker in destination:
                if worker not in replies:
                    silent.add(worker)
                elif (error := reply_error(replies[worker])) is not None:
                    refused.append(Outcome(worker, f"{command}: {error}"))
                else:
                    applied.append((worker, command))
        return applied, refused, silent

    def _ask(
        self,
        mailbox: Mailbox,
        name: str,
        arguments: Mapping[str, Any],
        workers: Sequence[str],
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """Replies by worker to `name`, sent only to `workers`; the silent are asked again, waiting longer."""
        if name not in COMMANDS:
            raise ValueError(f"control command {name!r} is not one the operator sends")
        replies: dict[str, Any] = {}
        missing = list(workers)
        for attempt in range(self.attempts if attempts is None else attempts):
            if not missing:
                break
            timeout = self.reply_timeout * 2**attempt
            answers = mailbox.broadcast(name, arguments, missing, timeout=timeout, limit=len(missing))
            replies.update((h, r) for answer in answers for h, r in answer.items() if h in missing)
            missing = [w for w in missing if w not in replies]
        return replies


def _finish_or_cancel(passes: Iterable[Future[ConvergeResult]]) -> None:
    """Cancel the passes not started yet and wait for those under way."""
    wait([future for future in passes if not future.cancel()])
