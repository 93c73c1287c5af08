"""Hostile pools at the real API server and at `validate`: each is refused by the CRD's schema or reported
as InvalidSpec by the operator, which stays up and keeps serving a good pool meanwhile; and a password
planted in any of them shows in no status, Event, log line or metric.

Hypothesis generates the pools (derandomized: the same few hundred every run): strings past their
bounds, templates nested up to the API server's own limit, task names in any script, broker URLs with
credentials in odd places, extraArgs that try to take over the flags the operator sets, nodes of the
wrong type, and templates that ask for the node's rights.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubernetes import client

from celery_worker_operator import spec
from celery_worker_operator.cli import RECURSION_LIMIT, main
from celery_worker_operator.manifests import InvalidPool, parse_pool
from celery_worker_operator.template_policy import TemplatePolicy, worker_template
from tests.support.operator_process import OperatorSetup
from tests.support.pools import condition, create_secret, pool_manifest, read_pool
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)
PLANTED = "FuzzPlantedPw"  # in every password these pools carry; never to be seen in what the operator writes
EXAMPLES = 300
Hostile = tuple[str, dict[str, Any]]  # (what is wrong, the manifest)

BASE = pool_manifest("fuzz", "q-fuzz")
BASE["spec"]["broker"] = {"url": "redis://127.0.0.1:6379/15"}
BASE["spec"]["limits"] = {"rateLimits": {"shop.tasks.send": "10/s"}}
BASE["spec"]["worker"]["extraArgs"] = ["-l", "INFO", "--without-gossip", "worker_eta_task_limit=10"]

# String fields and the length they may not exceed.
BOUNDED = {
    ("spec", "queues", 0): 200,
    ("spec", "worker", "app"): 253,
    ("spec", "worker", "image"): 512,
    ("spec", "worker", "extraArgs", 0): 256,
    ("spec", "broker", "url"): 2048,
}
OWNED_FORMS = [
    ["-n", "other@host"], ["--hostname=other@host"], ["-nother@host"], ["-Dnother@host"],
    ["-Q", "their-queue"], ["-Qtheir-queue"], ["--queues=their-queue"], ["-X", "q-fuzz"], ["--exclude-queues=q-fuzz"],
    ["-c", "64"], ["-c64"], ["--concurrency=64"], ["-Bc64"], ["-P", "solo"], ["-Psolo"], ["--pool=threads"],
    ["-E"], ["--events"], ["--task-events"], ["-BE"], ["-A", "other.app"], ["--app=other.app"],
]  # fmt: skip
URLS_WITH_PASSWORDS = [
    "redis://:{pw}@127.0.0.1:6379/0",
    "redis://celery:{pw}@127.0.0.1:6379/0",
    "rediss://celery:{pw}@redis.example:6380/0",
    "redis://127.0.0.1:6379/0?password={pw}",
    "redis://127.0.0.1:6379/0?db=1&password={pw}",
    "amqp://guest:{pw}@127.0.0.1:5672//",
    "pyamqp://guest:{pw}@127.0.0.1:5672/vhost",
    "amqps://u%40x:{pw}%21@rabbit.example//",
    "sentinel://:{pw}@127.0.0.1:26390;sentinel://127.0.0.1:26391/0",
    "sentinel://127.0.0.1:26390;sentinel://:{pw}@127.0.0.1:26391/0",
    "redis://:{pw};x@127.0.0.1/0",
]
RISKY_TEMPLATES = [
    {"spec": {"serviceAccountName": "admin"}},
    {
        "spec": {
            "hostIPC": True,
            "containers": [{"name": "worker", "env": [{"name": "URL", "value": f"redis://:{PLANTED}@r"}]}],
        }
    },
    {"spec": {"hostNetwork": True, "hostPID": True}},
    {"spec": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}},
    {"spec": {"containers": [{"name": "worker", "securityContext": {"privileged": True}}]}},
    {"spec": {"initContainers": [{"name": "i", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}},
]
TASK_NAME = re.compile(spec.TASK_NAME)


def _set(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(document)
    node: Any = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"password": PLANTED}
    for _ in range(depth):
        node = {"a": node}
    return node


huge_strings = st.builds(
    lambda path, extra, char: ("huge " + ".".join(map(str, path)), _set(BASE, path, char * (BOUNDED[path] + extra))),
    st.sampled_from(sorted(BOUNDED)),
    st.sampled_from([1, 1_000, 20_000]),
    st.sampled_from(["a", "é", "\U0001f525"]),
)
DEEP = "nested-this-deep"  # stands for the deep template while Hypothesis handles the example
deep_templates = st.builds(
    lambda depth: (f"template {depth} deep", _set(BASE, ("spec", "worker", "template"), {DEEP: depth})),
    st.sampled_from([33, 500, 1_100, 4_000]),  # 10,000 is the server's limit, but it may time out storing one
)
odd_task_names = st.builds(
    lambda field, name: (f"task name {name!r} in {field}", _set(BASE, ("spec", "limits"), {field: {name: "1/s"}})),
    st.sampled_from(["rateLimits", "poolRateLimits"]),
    st.text(min_size=1, max_size=40).filter(lambda name: TASK_NAME.fullmatch(name) is None),
)


def _with_url(url: str) -> dict[str, Any]:
    """BASE on `url`; a sentinel:// one with the master name it needs, so the password is its only fault."""
    options = {"transportOptions": {"master_name": "cwo-master"}} if url.startswith("sentinel") else {}
    return _set(BASE, ("spec", "broker"), {"url": url, **options})


password_urls = st.builds(
    lambda url: (f"password in {url}", _with_url(url.format(pw=PLANTED))), st.sampled_from(URLS_WITH_PASSWORDS)
)
BENIGN_ARGS = BASE["spec"]["worker"]["extraArgs"]
owned_flags = st.builds(
    lambda form, at: (f"extraArgs {form}", _set(BASE, ("spec", "worker", "extraArgs"), [*BENIGN_ARGS[:at], *form])),
    st.sampled_from(OWNED_FORMS),
    st.integers(0, len(BENIGN_ARGS)),
)
wrong_types = st.builds(
    lambda path, value: (f"{'.'.join(path)} = {value!r:.40}", _set(BASE, path, value)),
    st.sampled_from([
        ("spec", "broker"), ("spec", "queues"), ("spec", "worker"), ("spec", "worker", "concurrency"),
        ("spec", "worker", "events"), ("spec", "worker", "template"), ("spec", "autoscaling"),
        ("spec", "autoscaling", "maxReplicas"), ("spec", "limits", "rateLimits"),
    ]),
    st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.text(min_size=1, max_size=8).map(lambda s: s + "x")),
)  # fmt: skip
risky_templates = st.builds(
    lambda template: (f"template {json.dumps(template)[:60]}", _set(BASE, ("spec", "worker", "template"), template)),
    st.sampled_from(RISKY_TEMPLATES),
)
hostile_pools = st.one_of(
    huge_strings, deep_templates, odd_task_names, password_urls, owned_flags, wrong_types, risky_templates
)


def generated() -> list[Hostile]:
    """Up to EXAMPLES distinct hostile pools, the same every run, each named fz-<n>."""
    found: dict[str, Hostile] = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_pools)
    def collect(example: Hostile) -> None:
        found.setdefault(json.dumps(example[1]), example)

    collect()
    named = [(what, {**doc, "metadata": {"name": f"fz-{n}"}}) for n, (what, doc) in enumerate(found.values())]
    return [(what, _deepened(doc)) for what, doc in named]


def _deepened(document: dict[str, Any]) -> dict[str, Any]:
    template = worker_template(document)
    if not (isinstance(template, dict) and DEEP in template):
        return document
    return _set(document, ("spec", "worker", "template"), nested(template[DEEP]))


@pytest.fixture
def deep_recursion() -> Iterator[None]:
    """As deep as the operator reads (the client serialises the deepest templates recursively)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(RECURSION_LIMIT)
    yield
    sys.setrecursionlimit(before)


def create(api: client.ApiClient, namespace: str, document: dict[str, Any]) -> tuple[int, str]:
    """POST the manifest as JSON, as kubectl would (the client's models would refuse some before sending)."""
    url = f"{api.configuration.host}/apis/{spec.GROUP}/{spec.VERSION}/namespaces/{namespace}/{spec.PLURAL}"
    headers = {"Content-Type": "application/json"}
    response = api.rest_client.pool_manager.request("POST", url, body=json.dumps(document).encode(), headers=headers)
    return int(response.status), response.data.decode(errors="replace")


def refused_by_validate(document: dict[str, Any]) -> bool:
    try:
        parse_pool(copy.deepcopy(document), TemplatePolicy())
    except InvalidPool:
        return True
    return False


def test_hostile_pools_are_refused_or_invalid_and_the_operator_serves_on(
    operator: OperatorSetup,
    kube_api: client.ApiClient,
    kube_namespace: str,
    redis_url: str,
    names: tuple[str, str],
    tmp_path: Path,
    deep_recursion: None,
) -> None:
    ns = kube_namespace
    hostile = generated()
    assert len(hostile) >= 250 and len({what.split()[0] for what, _ in hostile}) >= 7, "every kind of attack"

    # validate, as a person runs it on the whole lot: every pool a problem, no crash.
    manifests = tmp_path / "hostile.yaml"
    manifests.write_text("".join(f"---\n{json.dumps(doc)}\n" for _, doc in hostile))
    result = CliRunner().invoke(main, ["validate", str(manifests)])
    assert result.exit_code == 2 and f"{len(hostile)} problems found" in result.output, result.output[-2000:]
    assert [what for what, doc in hostile if not refused_by_validate(doc)] == []

    good, queue = names
    create_secret(kube_api, ns, f"{good}-broker", redis_url)
    with operator.run() as running:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            spec.GROUP, spec.VERSION, ns, spec.PLURAL, pool_manifest(good, queue)
        )
        admitted = []
        for what, doc in hostile:
            code, answer = create(kube_api, ns, doc)
            assert code in (201, 400, 422), f"{what}: {code} {answer[:300]}"
            if code == 201:
                admitted.append((what, doc["metadata"]["name"]))
        print(f"{len(hostile)} hostile pools: {len(hostile) - len(admitted)} refused by the API server, "
              f"{len(admitted)} admitted")  # fmt: skip

        def not_yet_invalid() -> list[str]:
            return [what for what, name in admitted if (ready(kube_api, ns, name) or {}).get("reason") != "InvalidSpec"]

        wait_for(not_yet_invalid, lambda left: not left, timeout=300, interval=2)
        running.assert_alive()
        # The good pool is still measured: messages pushed now show in its status.
        redis.Redis.from_url(redis_url).lpush(queue, *[b"{}"] * 3)
        wait_for(lambda: read_pool(kube_api, ns, good).get("status", {}).get("depth"), lambda d: d == 3, timeout=60)
        assert_planted_nowhere(kube_api, ns, running.log(), running.metrics_port)


def ready(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    return condition(read_pool(api, namespace, name), "Ready")


def assert_planted_nowhere(api: client.ApiClient, namespace: str, log: str, metrics_port: int) -> None:
    objects = client.CustomObjectsApi(api)
    pools = objects.list_namespaced_custom_object(spec.GROUP, spec.VERSION, namespace, spec.PLURAL)["items"]
    assert [p["metadata"]["name"] for p in pools if PLANTED in json.dumps(p.get("status", {}))] == []
    events = client.CoreV1Api(api).list_namespaced_event(namespace).items
    assert [e.message for e in events if PLANTED in (e.message or "")] == []
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        assert PLANTED not in response.read().decode()
    assert PLANTED not in log
