"""`celery-worker-operator local`: the operator's loop on this machine, scaling real workers.

The same pool loop as on Kubernetes, with the LocalWorkload for replicas and a reporter that
keeps the latest status and decisions for a live terminal view instead of the API server.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from rich.console import Group
from rich.table import Table

from .metrics import PoolMetrics
from .pool_loop import EventStopping, LoopThreads, PoolLoop, SharedResources
from .reconciler import PassResult
from .spec import BrokerSpec, BrokerTLS, CeleryWorkerPool
from .status_view import queue_table
from .telemetry import PoolTelemetry, TelemetryMonitors
from .urls import PASSWORD_ENV, SSL_PARAMETER, USERNAME_ENV, tls_settings, with_credentials, with_tls
from .workloads.local import LocalWorkload, WorkerExit

EVENTS_SHOWN = 8
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # systemd/Docker/CI, Ctrl-C, a closed terminal

log = logging.getLogger(__name__)


class NoBrokerURL(LookupError):
    """The pool's broker URL needs what only a cluster has (a Secret) and nothing here replaces it,
    or the options meant to replace it do not fit together."""


def local_broker_url(broker: BrokerSpec, env: Mapping[str, str]) -> str:
    """The pool's broker URL on this machine: its url, completed with the user name and password
    from the environment (the variables its pods get from the Secrets) where the pool reads them
    from Secrets. A URL read whole from a Secret has no local stand-in: `--broker` gives it."""
    if broker.url is None:
        raise NoBrokerURL("this pool reads its broker URL from a Secret: give it with --broker")
    wanted = {USERNAME_ENV: broker.username_from is not None, PASSWORD_ENV: broker.password_from is not None}
    missing = [name for name, needed in wanted.items() if needed and name not in env]
    if missing:
        raise NoBrokerURL(
            f"this pool reads broker credentials from Secrets: set {' and '.join(missing)} or give --broker"
        )
    username, password = (env[name] if needed else None for name, needed in wanted.items())
    return with_credentials(broker.url, username, password)


def with_local_tls(url: str, tls: BrokerTLS | None, ca: Path | None, cert: Path | None, key: Path | None) -> str:
    """`url` with the TLS files of this machine (`--broker-ca/--broker-cert/--broker-key`), which
    stand in for the Secrets a pool's `broker.tls` reads; ssl_* parameters in the URL do as well."""
    sets_ssl = re.search(SSL_PARAMETER, url) is not None
    if ca is None and cert is None and key is None:
        if tls is not None and not sets_ssl:
            raise NoBrokerURL(
                "this pool reads its broker's TLS files from Secrets: give --broker-ca, --broker-cert and "
                "--broker-key, or a --broker URL with ssl_* parameters"
            )
        return url
    if (cert is None) != (key is None):
        raise NoBrokerURL("give --broker-cert and --broker-key together: the client certificate and its key")
    if urlsplit(url).scheme.lower() != "rediss":
        raise NoBrokerURL("--broker-ca, --broker-cert and --broker-key apply to a rediss:// broker")
    if sets_ssl:
        raise NoBrokerURL("the broker URL sets ssl_* parameters already: give the TLS files one way, not both")
    files = (str(path.resolve()) if path else None for path in (ca, cert, key))
    return with_tls(url, tls_settings(*files))


@dataclass
class LocalReporter:
    """Keeps what a Kubernetes API server would have been told, for the terminal view and summaries."""

    status_now: dict[str, Any] = field(default_factory=dict)
    events: deque[tuple[float, str, str, str]] = field(default_factory=lambda: deque(maxlen=200))
    scale_events: int = 0

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append((time.time(), type_, reason, message))
        self.scale_events += reason in ("ScaledUp", "ScaledDown")

    def status(self, status: dict[str, Any]) -> None:
        self.status_now = status


@dataclass
class LocalRun:
    """One pool running locally; `step()` is one pass, `close()` stops every worker."""

    pool: CeleryWorkerPool
    broker_url: str
    cwd: Path = field(default_factory=Path.cwd)
    worker_output: IO[bytes] | None = None
    reporter: LocalReporter = field(default_factory=LocalReporter)
    telemetry_window: float = 60.0  # seconds of events behind each rate: shorter reacts faster, noisier
    metrics: PoolMetrics = field(default_factory=PoolMetrics)  # serve() it to scrape a local run

    def __post_init__(self) -> None:
        self.shared = SharedResources(telemetry=TelemetryMonitors(window=self.telemetry_window), metrics=self.metrics)
        self.workload = LocalWorkload(
            self.pool, self.broker_url, cwd=self.cwd, log_stream=self.worker_output, on_exit=self._exited
        )
        namespace, name = self.pool.metadata.namespace, self.pool.metadata.name
        self.loop = PoolLoop(
            namespace=namespace,
            name=name,
            reporter=self.reporter,
            sources=lambda pool: self.shared.sources(
                namespace, name, (self.broker_url, None), self.workload, pool.spec.broker.transport_options
            ),
            metrics=self.metrics,
        )
        options = self.pool.spec.broker.transport_options
        monitor = self.shared.telemetry.monitor(self.broker_url, options.as_celery() if options else None)
        monitor.wait_connected(10.0)  # hear the workers from the first pass

    def step(self) -> PassResult:
        return self.loop.step(self.pool)

    def run(self, stop: threading.Event, on_pass: Callable[[LocalRun], None] = lambda run: None) -> None:
        """Pass after pass every pollSeconds (sooner on a burst at the floor) until `stop` is set."""
        asyncio.run(self.loop.run(EventStopping(stop), lambda: self.pool, LoopThreads(), lambda: on_pass(self)))

    def close(self) -> None:
        self.workload.close()
        self.shared.close()

    def telemetry(self) -> PoolTelemetry:
        """The pool's numbers from its workers' events, now."""
        return self.shared.telemetry.snapshot(self.broker_url, self.pool.identity.key, self.pool.spec.queues)

    def _exited(self, exit_: WorkerExit) -> None:
        self.reporter.event("Warning", "WorkerExited", exit_.message())

    def view(self) -> Group:
        """The live terminal view: queues, rates, slots, replicas and the latest decisions."""
        status = self.reporter.status_now
        queues = queue_table(status, f"pool {self.pool.metadata.name}")
        concurrency = self.pool.spec.worker.concurrency if self.pool.spec.worker else 1
        telemetry = self.telemetry()
        numbers = Table.grid(padding=(0, 2))
        numbers.add_row(
            "arrival", f"{telemetry.arrival_rate or 0:.2f}/s", "service", _seconds(telemetry.service_time_mean)
        )
        numbers.add_row(
            "busy slots",
            f"{telemetry.busy_slots}/{status.get('replicas', 0) * concurrency}",
            "replicas",
            f"{status.get('replicas', 0)} (desired {status.get('desiredReplicas', '-')}, {status.get('mode', '-')})",
        )
        numbers.add_row("start-up", _seconds(status.get("workerStartupSeconds")))
        for condition in status.get("conditions", []):
            if condition["type"] == "Advice" and condition["status"] == "True":
                for line in condition["message"].splitlines():
                    numbers.add_row("advice", line)
        decisions = Table("time", "event", "reason", title="last decisions")
        for at, _, reason, message in list(self.reporter.events)[-EVENTS_SHOWN:]:
            decisions.add_row(time.strftime("%H:%M:%S", time.localtime(at)), reason, message)
        return Group(queues, numbers, decisions)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[signal.Signals]]:
    """While inside, SIGTERM, SIGINT and SIGHUP each set `stop` and are listed in what this yields:
    the loop ends after its pass and every worker gets the same warm stop and grace period, whichever
    signal came. A signal while stopping is noted, not obeyed, so no worker is left half-stopped.
    Main thread only (Python runs signal handlers there); the handlers in force before come back after."""
    received: list[signal.Signals] = []

    def handle(number: int, _frame: object) -> None:
        received.append(signal.Signals(number))
        if stop.is_set():
            log.warning("%s: already stopping; every worker gets its grace period", received[-1].name)
            return
        log.info("%s: stopping workers (warm shutdown, then the grace period)...", received[-1].name)
        # Set from another thread: the handler may have interrupted this one inside stop.wait(),
        # holding the lock that set() takes.
        threading.Thread(target=stop.set, name="stop", daemon=True).start()

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"
