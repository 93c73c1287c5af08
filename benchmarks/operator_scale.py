"""One operator, many pools: what the control loop itself costs, on the real control plane.

    CWO_CLUSTER_BIN=... CWO_CLUSTER_STATE=... .venv/bin/python benchmarks/operator_scale.py \\
        [--pools 50,200,500] [--measure 60] [--bursts 20]

For each pool count N, a fresh namespace holds N CeleryWorkerPools (pollSeconds 10, minReplicas 0,
no workers: every pool idles at its floor) spread round-robin over four real brokers: Redis DBs 12
and 13 and two fresh RabbitMQ vhosts, each URL in a Secret. `celery-worker-operator run` runs as a
real process with the chart's ServiceAccount (tests/support/operator_process.py). After every pool
has been through a first pass and a settling period, over `--measure` seconds:
  cpu        the operator's process time (user + system, /proc) per wall second: 1.0 = one core;
  rss        its resident memory and threads at the end;
  requests   API requests per minute by verb, from the API server's apiserver_request_total for the
             resources the operator touches (pools, their status, Deployments, Pods, Secrets, Events;
             the namespace controller's cleanup of an earlier namespace shows there too), and all
             requests of ServiceAccounts (the operator is the only one) from the API priority and
             fairness counters, which do know the client;
  writes     status writes (PATCH celeryworkerpools/status) per pool per minute;
  conns      the operator's TCP connections to each broker URL: its sockets (/proc) joined with Redis's
             CLIENT LIST (db=) and RabbitMQ's management API (vhost).
Then `--bursts` times, one at a time on a different pool at its floor while all others keep polling,
20 tasks are published to the pool's queue; the delay is until its Deployment's replicas rise (seen by
a watch). Reported: p50/p95/max.

The baseline is the smallest N of the same run: per-pool CPU and request rates at each larger N are
printed as a ratio to it (1.0 = cost grows linearly with pools), with the slope of CPU over pools.
Done when (issue 20), at 500 pools: cpu <= 0.25, rss <= 300 MB, <= 1 status write per pool per minute,
<= 2 connections per broker URL, burst p95 <= pollSeconds + 1 s, per-pool CPU ratio <= 1 (linear).
The machine is shared: CPU numbers are process time (not wall), yet noisy; run it more than once.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from celery import Celery
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT)]

from tests.support.broker_connections import tcp_connections  # noqa: E402
from tests.support.cluster import STATE, Cluster  # noqa: E402
from tests.support.operator_process import OperatorProcess, operator_setup  # noqa: E402
from tests.support.rabbitmq_admin import management_call  # noqa: E402

from celery_worker_operator import spec  # noqa: E402
from celery_worker_operator.simulation.engine import percentile  # noqa: E402

POLL_SECONDS = 10
REDIS_DBS = (12, 13)
REDIS = "redis://127.0.0.1:6379"
AMQP = "amqp://guest:guest@127.0.0.1:5672"
MANAGEMENT = os.environ.get("CWO_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")
BURST_TASKS = 20
OPERATOR_RESOURCES = {"celeryworkerpools", "deployments", "pods", "secrets", "events"}
TICKS = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} ([0-9.e+-]+)$")


@dataclass(frozen=True)
class Broker:
    name: str  # the Secret's name
    url: str
    redis_db: int | None = None
    vhost: str | None = None


@dataclass
class Sample:
    pools: int
    cpu: float  # cores
    rss_mb: float
    threads: int
    requests: dict[str, float]  # verb -> per minute
    service_account_requests: float  # per minute
    status_writes: float  # per pool per minute
    connections: dict[str, int]  # broker -> the operator's connections
    status_changes: Counter[str]  # status field -> how often it changed in the window
    bursts: list[float]


def pool_manifest(name: str, broker: Broker) -> dict[str, Any]:
    return {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "metadata": {"name": name},
        "spec": {
            "broker": {"urlFrom": {"secretKeyRef": {"name": broker.name, "key": "url"}}},
            "queues": [queue_of(name)],
            "worker": {"app": "bench.app:app", "image": "registry.example/app:1", "concurrency": 2},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "pollSeconds": POLL_SECONDS},
        },
    }


def queue_of(pool: str) -> str:
    return f"bench-{pool}"


@contextmanager
def brokers(run: str) -> Iterator[list[Broker]]:
    """Two Redis DBs and two fresh RabbitMQ vhosts (deleted afterwards, with their queues)."""
    vhosts = [f"cwo-bench-{run}-{i}" for i in range(2)]
    for vhost in vhosts:
        management_call(MANAGEMENT, "PUT", f"/api/vhosts/{vhost}")
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        management_call(MANAGEMENT, "PUT", f"/api/permissions/{vhost}/guest", everything)
    found = [Broker(f"redis-{db}", f"{REDIS}/{db}", redis_db=db) for db in REDIS_DBS]
    found += [Broker(f"rabbit-{i}", f"{AMQP}/{quote(v, safe='')}", vhost=v) for i, v in enumerate(vhosts)]
    try:
        yield found
    finally:
        for vhost in vhosts:
            management_call(MANAGEMENT, "DELETE", f"/api/vhosts/{vhost}")


def declare_queues(broker: Broker, queues: list[str]) -> None:
    """RabbitMQ queues exist once workers have run; Redis has no queue objects."""
    if broker.vhost is None:
        return
    app = Celery(broker=broker.url, set_as_current=False)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in queues:
            channel.queue_declare(queue, durable=True, auto_delete=False)
    app.close()


def create_pools(api: client.ApiClient, namespace: str, run: str, count: int, found: list[Broker]) -> dict[str, Broker]:
    """`count` pools over the brokers in turn; named (and their queues) after the run, so that a run of
    the benchmark beside this one (another checkout, on the same Redis DBs) fills no queue of ours."""
    core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
    for broker in found:
        data = {"url": base64.b64encode(broker.url.encode()).decode()}
        core.create_namespaced_secret(namespace, {"metadata": {"name": broker.name}, "data": data})
    pools = {f"p{run}-{i:03d}": found[i % len(found)] for i in range(count)}
    for broker in found:
        declare_queues(broker, [queue_of(name) for name, b in pools.items() if b is broker])
    for name, broker in pools.items():
        objects.create_namespaced_custom_object(
            spec.GROUP, spec.VERSION, namespace, spec.PLURAL, pool_manifest(name, broker)
        )
    return pools


def wait_for_first_passes(api: client.ApiClient, namespace: str, count: int, timeout: float) -> float:
    """Seconds until every pool carries a status with replicas: a pass that saw its Deployment is done
    (a pass that ran before the Deployment was applied is tried again after 30 s, not pollSeconds)."""
    started = time.monotonic()
    objects = client.CustomObjectsApi(api)
    while time.monotonic() - started < timeout:
        try:
            pools = objects.list_namespaced_custom_object(spec.GROUP, spec.VERSION, namespace, spec.PLURAL)["items"]
        except (ApiException, ProtocolError):  # a loaded API server times out or cuts a response now and then
            continue
        if sum(1 for p in pools if "replicas" in (p.get("status") or {})) >= count:
            return time.monotonic() - started
        time.sleep(2)
    raise TimeoutError(f"not every pool had a first pass within {timeout} s")


def process_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def proc_status(pid: int, field: str) -> int:
    """A number of /proc/<pid>/status (VmRSS in KiB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def api_metrics(api: client.ApiClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = api.call_api("GET", api.configuration.host + "/metrics")
    response.read()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in response.data.decode().splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] in ("apiserver_request_total", "apiserver_flowcontrol_dispatched_requests_total"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match[2]))
            samples[(match[1], labels)] = float(match[3])
    return samples


def request_rates(before: dict[Any, float], after: dict[Any, float], minutes: float) -> tuple[Counter[str], float]:
    """(per minute by verb for the operator's resources, per minute of all ServiceAccount requests)."""
    verbs: Counter[str] = Counter()
    accounts = 0.0
    for key, value in after.items():
        name, labels = key[0], dict(key[1])
        delta = value - before.get(key, 0.0)
        if name == "apiserver_request_total" and labels.get("resource") in OPERATOR_RESOURCES:
            verb = labels["verb"] + ("/" + labels["subresource"] if labels.get("subresource") else "")
            verbs[f"{verb} {labels['resource']}"] += delta / minutes
        elif name.startswith("apiserver_flowcontrol") and labels.get("flow_schema") == "service-accounts":
            accounts += delta / minutes
    return verbs, accounts


def broker_connections(pid: int, found: list[Broker]) -> dict[str, int]:
    """The operator's connections to each broker URL."""
    ports = tcp_connections(pid)
    counts = dict.fromkeys((b.name for b in found), 0)
    by_db = {b.redis_db: b.name for b in found if b.redis_db is not None}
    last_commands: Counter[str] = Counter()  # name and last command of each Redis connection: which part holds it
    for entry in redis.Redis(host="127.0.0.1", port=6379).client_list():
        port = int(entry["addr"].rsplit(":", 1)[1])
        if ports.get(port) == 6379 and int(entry["db"]) in by_db:
            counts[by_db[int(entry["db"])]] += 1
            last_commands[f"{entry['name'] or '-'} {entry['cmd']}"] += 1
    by_vhost = {b.vhost: b.name for b in found if b.vhost is not None}
    for connection in management_json("/api/connections?columns=vhost,peer_port"):
        if ports.get(connection["peer_port"]) == 5672 and connection["vhost"] in by_vhost:
            counts[by_vhost[connection["vhost"]]] += 1
    print(f"  the operator's Redis connections by name and last command: {dict(last_commands)}")
    return counts


def management_json(path: str) -> Any:
    parts = urlsplit(MANAGEMENT)
    credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.hostname}:{parts.port}{path}",
        headers={"Authorization": "Basic " + base64.b64encode(credentials).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def follow(handle: Callable[[dict[str, Any]], None], lister: Callable[..., Any], *args: Any) -> threading.Event:
    """Watch `lister(*args)` in a thread, handing each event to `handle`, again after the API server
    ends a watch (it does under load), until the returned event is set."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(lister, *args, timeout_seconds=60):
                    if stop.is_set():
                        stream.stop()
                    elif isinstance(event, dict) and event.get("type") in ("ADDED", "MODIFIED"):
                        handle(event)
            except (ProtocolError, ApiException):
                time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()
    return stop


class ScaleWatch:
    """When each Deployment of the namespace first had replicas above zero, from a watch."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.first_scaled: dict[str, float] = {}
        self._stop = follow(self._seen, client.AppsV1Api(api).list_namespaced_deployment, namespace)

    def _seen(self, event: dict[str, Any]) -> None:
        deployment = event["object"]
        if (deployment.spec.replicas or 0) > 0:
            self.first_scaled.setdefault(deployment.metadata.name, time.time())

    def wait(self, name: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name in self.first_scaled:
                return self.first_scaled[name]
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        self._stop.set()


class StatusWatch:
    """Which parts of the pools' status change between writes: what a write per poll is made of."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.changed: Counter[str] = Counter()
        self._last: dict[str, dict[str, Any]] = {}
        objects = client.CustomObjectsApi(api)
        args = (spec.GROUP, spec.VERSION, namespace, spec.PLURAL)
        self._stop = follow(self._seen, objects.list_namespaced_custom_object, *args)

    def _seen(self, event: dict[str, Any]) -> None:
        pool = event["object"]
        name, status = pool["metadata"]["name"], pool.get("status") or {}
        before = self._last.get(name)
        self._last[name] = status
        if before is not None:
            self.changed.update(changed_fields(before, status))

    def stop(self) -> None:
        self._stop.set()


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Top-level status fields that differ; a condition by its type and the fields of it that moved."""
    changed = [key for key in {*before, *after} - {"conditions"} if before.get(key) != after.get(key)]
    old = {c["type"]: c for c in before.get("conditions", [])}
    for condition in after.get("conditions", []):
        previous = old.get(condition["type"], {})
        changed += [f"{condition['type']}.{k}" for k in condition if previous.get(k) != condition[k]]
    return changed


def bursts(api: client.ApiClient, namespace: str, pools: dict[str, Broker], count: int) -> list[float]:
    """Burst-to-scale-call delays, one burst at a time on pools spread over every broker."""
    scaled = ScaleWatch(api, namespace)
    apps = {b.name: Celery(broker=b.url, set_as_current=False) for b in set(pools.values())}
    delays: list[float] = []
    try:
        for name in list(pools)[-count:]:
            time.sleep(1 + (len(delays) * 0.37) % 2)  # land at varied phases of the polls
            app = apps[pools[name].name]
            with app.producer_or_acquire() as producer:
                for _ in range(BURST_TASKS):
                    app.send_task("bench.work", queue=queue_of(name), producer=producer)
            landed = time.time()
            at = scaled.wait(name, timeout=3 * POLL_SECONDS)
            delays.append(at - landed if at is not None else float("inf"))
    finally:
        scaled.stop()
        for app in apps.values():
            app.close()
    return delays


def measure(cluster: Cluster, pools_count: int, seconds: float, burst_count: int, settle: float) -> Sample:
    run = uuid.uuid4().hex[:6]
    namespace = f"bench-scale-{pools_count}-{run}"
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    logs = Path(tempfile.mkdtemp(prefix=f"cwo-bench-{pools_count}-"))
    try:
        with ExitStack() as stack:
            found = stack.enter_context(brokers(run))
            setup = stack.enter_context(operator_setup(cluster, api, namespace, logs))
            pools = create_pools(api, namespace, run, pools_count, found)
            operator: OperatorProcess = stack.enter_context(setup.run())
            first = wait_for_first_passes(api, namespace, pools_count, timeout=max(120.0, pools_count))
            print(f"  {pools_count} pools: every first pass done after {first:.0f} s; settling {settle:.0f} s")
            time.sleep(settle)
            pid = operator.popen.pid
            statuses = StatusWatch(api, namespace)
            before, cpu_before, wall_before = api_metrics(api), process_seconds(pid), time.monotonic()
            time.sleep(seconds)
            statuses.stop()
            after, cpu_after, wall_after = api_metrics(api), process_seconds(pid), time.monotonic()
            minutes = (wall_after - wall_before) / 60
            verbs, accounts = request_rates(before, after, minutes)
            writes = verbs.get("PATCH/status celeryworkerpools", 0.0) / pools_count
            sample = Sample(
                pools_count,
                (cpu_after - cpu_before) / (wall_after - wall_before),
                proc_status(pid, "VmRSS") / 1024,
                proc_status(pid, "Threads"),
                dict(verbs),
                accounts,
                writes,
                broker_connections(pid, found),
                statuses.changed,
                bursts(api, namespace, pools, burst_count) if burst_count else [],
            )
            operator.assert_alive()
            print(f"  operator log: {operator.log_path}")
            return sample
    finally:
        core.delete_namespace(namespace, propagation_policy="Background")
        for db in REDIS_DBS:  # this run's queues and bindings only: another run may share the DBs
            store = redis.Redis.from_url(f"{REDIS}/{db}")
            for key in store.scan_iter(match=f"*{queue_of(f'p{run}-')}*"):
                store.delete(key)
        api.close()


def report(sample: Sample, baseline: Sample) -> None:
    n = sample.pools
    print(f"\n{n} pools (pollSeconds {POLL_SECONDS}):")
    print(f"  cpu          {sample.cpu:.3f} cores ({1000 * sample.cpu / n:.2f} ms per pool per second)")
    print(f"  rss          {sample.rss_mb:.0f} MB, {sample.threads} threads")
    total = sum(sample.requests.values())
    print(
        f"  requests     {total:.0f}/min on the operator's resources; "
        f"ServiceAccounts: {sample.service_account_requests:.0f}/min"
    )
    for verb, rate in sorted(sample.requests.items(), key=lambda kv: -kv[1]):
        if rate >= 0.5:
            print(f"    {verb:36s} {rate:8.1f}/min  {rate / n:6.2f}/pool/min")
    print(f"  writes       {sample.status_writes:.2f} status writes per pool per minute")
    common = ", ".join(f"{field} {count}" for field, count in sample.status_changes.most_common(6))
    print(f"  what changed {common or 'nothing'}")
    print(f"  connections  {', '.join(f'{k} {v}' for k, v in sample.connections.items())}")
    if sample.bursts:
        finite = [d for d in sample.bursts if d != float("inf")]
        missed = len(sample.bursts) - len(finite)
        print(
            f"  burst->scale p50 {percentile(sample.bursts, 50):.2f} s  p95 {percentile(sample.bursts, 95):.2f} s"
            f"  max {max(sample.bursts):.2f} s over {len(sample.bursts)} bursts ({missed} not scaled in time)"
        )
    if sample is not baseline:
        per_pool = (sample.cpu / n) / (baseline.cpu / baseline.pools) if baseline.cpu else float("nan")
        # The ServiceAccount count is the operator's alone (the namespace controller's cleanup of an
        # earlier run's namespace shows in the per-resource counts).
        requests = (sample.service_account_requests / n) / (baseline.service_account_requests / baseline.pools)
        slope = (sample.cpu - baseline.cpu) / (n - baseline.pools)
        print(
            f"  vs {baseline.pools} pools: per-pool cpu x{per_pool:.2f}, per-pool requests x{requests:.2f} "
            f"(1.0 = linear); slope {1000 * slope:.3f} ms cpu per pool per second"
        )


def main() -> None:
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # as the operator's image sets it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pools", default="50,200,500", help="pool counts, comma-separated (the first is the baseline)"
    )
    parser.add_argument("--measure", type=float, default=60.0, help="seconds of steady state measured")
    parser.add_argument("--settle", type=float, default=2 * POLL_SECONDS, help="seconds after the first passes")
    parser.add_argument("--bursts", type=int, default=20)
    args = parser.parse_args()
    cluster = Cluster.from_state(STATE, started_here=False)
    samples = []
    for count in (int(n) for n in args.pools.split(",")):
        samples.append(measure(cluster, count, args.measure, args.bursts, args.settle))
        report(samples[-1], samples[0])


if __name__ == "__main__":
    main()
