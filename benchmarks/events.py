"""Our event monitor against celery's Receiver + State on the same stream of real Celery events.

    .venv/bin/python benchmarks/events.py [--brokers rabbitmq,redis] [--events 1000000]
                                          [--baseline-events 100000] [--batch 24]

For each broker, in this one run: a consumer process subscribes (ours: `EventMonitor`; the
baseline: `app.events.Receiver` feeding `app.events.State`, as Flower does), then this process
publishes task-received/started/succeeded lifecycles and heartbeats of 8 workers in 4 pools with
celery's own `EventDispatcher`, batching task events into `task.multi` messages of `--batch` as
workers do (`--batch 1`: one event per message). Publishing is paced so the consumer never lags
more than `MAX_LAG` events (the brokers' buffers stay small); the consumer is the bottleneck.
Reported: events/s from the consumer's first to its last event, and its RSS after the stream.
Each run uses its own event exchange, so nothing else on the broker is counted or disturbed.
RabbitMQ is the shared server (CWO_TEST_AMQP_URL); Redis is a private redis-server on a free port.
Targets (issue 5): ours >= 5x the baseline, >= 20,000 events/s on RabbitMQ, < 200 MB RSS after 1M.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis as redis_client
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT)]

from tests.support.redis_server import PrivateRedis  # noqa: E402

from celery_worker_operator.telemetry import EventMonitor  # noqa: E402

MAX_LAG = 20_000  # events published but not yet consumed: ~8 MB of JSON at most in a broker buffer
IDLE_GIVE_UP = 15.0  # a consumer that hears nothing for this long reports what it has
POOLS, WORKERS_PER_POOL, HEARTBEAT_EVERY = 4, 2, 500


def app_for(url: str, exchange: str) -> Celery:
    app = Celery("bench", broker=url, set_as_current=False)
    app.conf.update(event_exchange=exchange, event_queue_ttl=3600.0)  # lossless while the consumer catches up
    return app


def memory_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, from /proc (no psutil needed)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# --- consumer side (a child process, so it has a core and its own RSS) ---------------------------


def consume(kind: str, url: str, exchange: str, expect: int) -> None:
    """Subscribe, say `ready`, print `progress N` every 0.2 s, then one JSON line of results."""
    count, stop = (ours if kind == "ours" else celery_baseline)(url, exchange)
    print("ready", flush=True)
    first = last = said = 0.0
    seen = 0
    while seen < expect and not (first and time.monotonic() - last > IDLE_GIVE_UP):
        time.sleep(0.005)
        now, previous, seen = time.monotonic(), seen, count()
        if seen != previous:
            first, last = first or now, now
        if now - said >= 0.2:
            print(f"progress {seen}", flush=True)
            said = now
    rss, peak = memory_mb()
    stop()
    print(json.dumps({"events": seen, "seconds": last - first, "rss_mb": rss, "peak_mb": peak}), flush=True)


def ours(url: str, exchange: str) -> tuple[Callable[[], int], Callable[[], None]]:
    monitor = EventMonitor(url, exchange=exchange, queue_ttl=3600.0).start()
    if not monitor.wait_connected(30):
        raise SystemExit(f"monitor could not connect: {monitor.last_error}")
    return (lambda: monitor.events), monitor.stop


def celery_baseline(url: str, exchange: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """Flower's way: every event through `State.event`, in a capture thread."""
    app = app_for(url, exchange)
    state = app.events.State()
    counted = [0]
    subscribed = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        state.event(event)
        counted[0] += 1

    connection = app.connection_for_read()
    receiver = app.events.Receiver(connection, handlers={"*": on_event})
    receiver.on_consume_ready = lambda *args, **kwargs: subscribed.set()
    threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True).start()
    subscribed.wait(30)
    time.sleep(0.5)  # Redis subscribes inside the first drain_events, just after consume-ready

    def stop() -> None:
        receiver.should_stop = True

    return (lambda: counted[0]), stop


# --- publisher side (this process) ----------------------------------------------------------------


def dispatchers_for(app: Celery, connection: Any, batch: int) -> list[Any]:
    """Celery's own dispatchers, one per worker; like a worker's, they buffer task events into task.multi."""
    return [
        app.events.Dispatcher(
            connection,
            hostname=f"bench{pool}@pod-{worker}",
            buffer_group={"task"} if batch > 1 else None,
            buffer_limit=batch,
        )
        for pool in range(POOLS)
        for worker in range(WORKERS_PER_POOL)
    ]


def stream(dispatchers: list[Any]) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """Endless (dispatcher, type, fields): task lifecycles round-robin over the workers, and heartbeats."""
    for number in itertools.count():
        dispatcher = dispatchers[number % len(dispatchers)]
        task = str(uuid.uuid4())
        received = {"uuid": task, "name": f"app.tasks.job{number % 7}", "args": "(1, 'x')", "kwargs": "{}"}
        received |= {"root_id": task, "parent_id": None, "retries": 0, "eta": None, "expires": None}
        yield dispatcher, "task-received", received
        yield dispatcher, "task-started", {"uuid": task}
        yield dispatcher, "task-succeeded", {"uuid": task, "result": "None", "runtime": 0.01 + (number % 50) / 100}
        if number % HEARTBEAT_EVERY == 0:
            yield dispatcher, "worker-heartbeat", {"freq": 2.0, "active": number % 3, "processed": number}


def publish(url: str, exchange: str, events: int, batch: int, consumed: Callable[[], int]) -> float:
    """Publish exactly `events` events, never more than MAX_LAG ahead of the consumer; returns events/s."""
    app = app_for(url, exchange)
    with app.connection_for_write() as connection:
        dispatchers = dispatchers_for(app, connection, batch)
        began = time.monotonic()
        for sent, (dispatcher, kind, fields) in enumerate(itertools.islice(stream(dispatchers), events), 1):
            dispatcher.send(kind, **fields)
            while sent % 1000 == 0 and sent - consumed() > MAX_LAG:
                time.sleep(0.002)
        for dispatcher in dispatchers:
            dispatcher.flush(errors=False)  # the last partial task.multi of each worker
        return events / (time.monotonic() - began)


def run_consumer(kind: str, url: str, exchange: str, events: int, batch: int, prefill: bool) -> dict[str, Any]:
    """One consumer process against one freshly published stream of `events`.

    `prefill`: the consumer is frozen (SIGSTOP) while the whole stream is published and thawed
    after, so it drains at its own speed however slow the publisher is: that measures throughput.
    Otherwise publishing is paced to the consumer: that measures memory over a long stream.
    """
    command = [sys.executable, __file__, "consume", kind, url, exchange, str(events)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise SystemExit(f"the {kind} consumer did not start")
    progress = [0]
    result: dict[str, Any] = {}

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("progress "):
                progress[0] = int(line.split()[1])
            elif line.startswith("{"):
                result.update(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if prefill:
        os.kill(child.pid, signal.SIGSTOP)
        result["publish_rate"] = publish(url, exchange, events, batch, lambda: events)
        os.kill(child.pid, signal.SIGCONT)
    else:
        result["publish_rate"] = publish(url, exchange, events, batch, lambda: progress[0])
    child.wait(timeout=900)
    reader.join(5)
    return result


def delete_exchange(url: str, exchange: str) -> None:
    """RabbitMQ keeps a declared exchange: leave the shared server as we found it."""
    with Celery(broker=url, set_as_current=False).connection_for_write() as connection:
        connection.default_channel.exchange_delete(exchange)


def bench_broker(broker: str, url: str, args: argparse.Namespace) -> list[str]:
    exchange = f"celeryev.bench.{uuid.uuid4().hex[:8]}"
    try:
        runs = {
            "ours, prefilled": run_consumer("ours", url, exchange, args.events, args.batch, prefill=True),
            "celery, prefilled": run_consumer("celery", url, exchange, args.events, args.batch, prefill=True),
            "ours, paced stream": run_consumer("ours", url, exchange, args.long_events, args.batch, prefill=False),
        }
    finally:
        if broker == "rabbitmq":
            delete_exchange(url, exchange)
    rates = {name: r["events"] / r["seconds"] if r.get("seconds") else 0.0 for name, r in runs.items()}
    rows = [
        f"{broker:9} {name:19} {r['events']:>9,} {rates[name]:>10,.0f} {r['rss_mb']:>8.1f} {r['peak_mb']:>8.1f}"
        f" {r['publish_rate']:>10,.0f}"
        for name, r in runs.items()
    ]
    ratio = rates["ours, prefilled"] / max(rates["celery, prefilled"], 1e-9)
    rows.append(f"{broker:9} ratio ours/celery: {ratio:.1f}x (target >= 5x)")
    return rows


def unlimited_pubsub_buffer(url: str) -> None:
    """Let the private Redis hold a prefilled stream for a frozen subscriber instead of dropping it."""
    client = redis_client.Redis.from_url(url)
    client.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default="rabbitmq,redis")
    parser.add_argument("--events", type=int, default=200_000, help="prefilled events, to compare throughput")
    parser.add_argument("--long-events", type=int, default=1_000_000, help="paced events, to read RSS after")
    parser.add_argument("--batch", type=int, default=24, help="task events per task.multi message (workers: 24)")
    args = parser.parse_args()
    header = (
        f"{'broker':9} {'consumer':19} {'events':>9} {'events/s':>10} {'RSS MB':>8} {'peak MB':>8} {'publish/s':>10}"
    )
    print(f"batch={args.batch} events per message; {os.cpu_count()} CPUs\n{header}", flush=True)
    for broker in args.brokers.split(","):
        if broker == "rabbitmq":
            rows = bench_broker(
                broker, os.environ.get("CWO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"), args
            )
        else:
            with tempfile.TemporaryDirectory() as directory, PrivateRedis(Path(directory), uuid.uuid4().hex) as redis:
                unlimited_pubsub_buffer(redis.url)
                rows = bench_broker(broker, redis.url, args)
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["consume"]:
        consume(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
