"""Run kopf and the `kubernetes` client against kmock's Kubernetes API emulator, in pytest.

No kube-apiserver exists on the test machines, so operator tests talk HTTP to kmock 0.8
(`kmock.KubernetesEmulator`, an in-memory API server by kopf's author). This module wraps it in
`ClusterEmulator`, a subclass that closes the gaps our operator would trip over (see "kmock as
shipped" below), runs it in a background thread, and starts kopf against it in the test's loop.

Fixtures (enable them in a test module with ``pytest_plugins = ["tests.support.k8s"]``):

``k8s_emulator`` -> `Emulator`
    A running `ClusterEmulator` on ``http://127.0.0.1:<random port>``, with kmock's bundled
    built-in resources (Pods, Secrets, Events, Deployments, ...) and our CeleryWorkerPool CRD
    (from ``crd.build_crd()``; the CRD object itself is stored too). One per test: no state leaks.
    ``emulator.url``, ``emulator.objects(resource, namespace=None)`` (a thread-safe snapshot of
    stored objects), ``emulator.requests`` (kmock's request log) and ``emulator.kmock``.
``k8s_api`` -> ``kubernetes.client.ApiClient``
    A client configured for the emulator (no auth, no TLS, no proxy); closed after the test.
    ``api_client_for(emulator)`` builds one outside fixtures (e.g. for operator code).

Helpers:

``running_operator(emulator, registry, *, namespaces=(), settings=None, memo=None, timeout=5)``
    Async context manager: adds a ``@kopf.on.login`` handler (returning
    ``kopf.ConnectionInfo(server=emulator.url)``) to ``registry`` for the duration of the block,
    starts ``kopf.operator(registry=..., standalone=True, clusterwide=not namespaces, ...)`` as a
    task in the test's loop, and yields an `Operator` once kopf is ready AND its watch streams are
    open at the emulator (so an object created next is seen by a watch, deterministically). On
    exit it raises kopf's stop flag, awaits the task (bounded by ``timeout``), then cancels
    anything still running; an operator that crashed makes the test fail with its exception.
    ``fast_settings()`` gives the short timeouts it uses by default (and ``scanning.disabled``:
    resources are discovered once at start-up, so register extra CRDs before starting kopf).
    The login handler's ConnectionInfo has priority 10**6, so it outranks any login handler the
    product's registry may carry. Blocking `kubernetes` client calls are fine in tests and in
    async handlers: the emulator answers from its own thread, not the test's loop.
``wait_for(measure, ok=bool, timeout=5.0, interval=0.05)``
    Async polling (`tests.support.waiting.wait_for_async`): ``measure`` may be sync or async.
``apply_pool(api, manifest)`` / ``read_pool(api, name, namespace)`` / ``events_for(api, name,
namespace)`` / ``pods_labelled(api, namespace, labels)``.

Usage::

    pytest_plugins = ["tests.support.k8s"]

    async def test_something(k8s_emulator, k8s_api):
        registry = kopf.OperatorRegistry()

        @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
        async def created(patch, **_):
            patch.status["seen"] = True

        async with running_operator(k8s_emulator, registry):
            apply_pool(k8s_api, manifest)
            await wait_for(lambda: read_pool(k8s_api, "p").get("status", {}).get("seen"))

kmock as shipped (0.8), checked here, and what `ClusterEmulator` does about it:

- Watches: yes, kmock streams ADDED/MODIFIED/DELETED for every change made through its HTTP API
  (not for direct writes to ``kmock.objects``), so kopf's create/update/delete handlers fire.
  Shipped kmock replays EVERY stored object as ADDED to each new watch, whatever its
  ``resourceVersion``: kopf (list, then watch from the list's version) then processed stale bodies
  it had already patched, and its next JSON patch failed its resourceVersion ``test`` op, so the
  creation never finished. Here a watch from a version replays only objects changed after it
  (a watch without one, or from "0", replays all), and subscribes to changes BEFORE the replay
  (shipped kmock subscribed after it, so a change made meanwhile was lost). ``timeoutSeconds``
  was ignored (a watch never ended); it is honoured here. Not emulated: a DELETED event for an
  object deleted between a listing and the watch that follows it; bookmarks; 410 Gone.
- Patch types: kmock parses any JSON body whatever the Content-Type. A JSON object is applied as
  a JSON merge patch (RFC 7386: dicts merge, ``null`` deletes, lists are replaced), a JSON array as
  a JSON patch (RFC 6902, via ``jsonpatch``). So kopf's merge-patch and json-patch work, and the
  kubernetes client's strategic-merge-patch (its default for built-ins) is applied as a merge
  patch: list fields (containers, env, ...) are REPLACED, not merged by key, and ``$patch``
  directives are not understood. Send whole lists. A failed JSON-patch ``test`` op was a 500;
  here it is a 422, which is what kopf expects in order to retry on the next cycle. As on a real
  server, here a body that does not fit its Content-Type is a 400 (NB: ``CustomObjectsApi.patch_*``
  sends a list of ops as merge-patch unless given ``_content_type="application/json-patch+json"``),
  strategic-merge-patch on a custom resource is a 415, and server-side apply is a 415 (not emulated).
- PUT (the client's ``replace_*``) is not routed by kmock (404); here it replaces the object
  (or only its status / replicas on ``/status`` / ``/scale``), with optimistic concurrency.
- metadata: kmock stores the body as sent. Here a create gets ``uid``, ``creationTimestamp``,
  ``generation: 1``, ``namespace`` from the URL and a name from ``generateName`` (kopf's Events
  use it: shipped kmock stored them all under the name None, so the second one was a 409).
- resourceVersion: not tracked by kmock (kopf's json-patch ``test`` op on it then failed). Here
  every write gets a new one from a counter, a write carrying a stale one gets 409 Conflict, and
  ``metadata.generation`` is bumped by writes that touch ``spec``.
- Subresources: kmock merges a PATCH on ``/status`` or ``/scale`` into the whole object and
  returns the whole object. Here, as on a real server, ``/status`` writes change only ``status``,
  writes to the main resource of a kind WITH a status subresource leave ``status`` alone (so an
  operator that patches status through the main endpoint fails its tests as it would fail in a
  cluster), and ``/scale`` reads and writes speak ``autoscaling/v1`` ``Scale`` objects mapped to
  the resource's replicas paths (the CRD's ``specReplicasPath`` etc.; ``.spec.replicas`` and
  ``.status.replicas`` for Deployments, ReplicaSets and StatefulSets). Creates keep ``status``
  as sent (a convenience for tests that create Pods already Running).
- Selectors: kmock ignores ``labelSelector`` and ``fieldSelector``. Here lists and watches honour
  label selectors (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and field
  selectors on ``metadata.name`` / ``metadata.namespace`` (others are ignored, as before).
- Not emulated: admission (schema validation, defaults, CEL rules: see
  `tests.support.apiserver`), controllers (a Deployment creates no Pods; garbage collection of
  owned objects does not happen), ``deletecollection``, server-side apply, pagination.
- Deletion: kmock honours finalizers (sets ``deletionTimestamp``, deletes when the last one goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import jsonpatch
import jsonpointer
import kmock
import kopf
import pytest
from kmock._internal import rendering
from kopf._cogs.structs.references import Insights
from kubernetes import client

from celery_worker_operator.crd import build_crd
from tests.support.waiting import wait_for_async

GROUP = "celery-operator.dev"
VERSION = "v1alpha1"
PLURAL = "celeryworkerpools"
KIND = "CeleryWorkerPool"
POOLS = f"{GROUP}/{VERSION}/{PLURAL}"
DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"
SECRETS = "v1/secrets"
EVENTS = "v1/events"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"

wait_for = wait_for_async  # re-exported: the async poll-until for operator tests

Json = dict[str, Any]


@dataclass(frozen=True)
class ScalePaths:
    """Where a resource keeps what its `/scale` subresource shows (a CRD's `subresources.scale`)."""

    spec_replicas: str = ".spec.replicas"
    status_replicas: str = ".status.replicas"
    label_selector: str | None = None  # a string field; None: rendered from `.spec.selector`


BUILTIN_SCALE = {
    kmock.resource("apps/v1/deployments"): ScalePaths(),
    kmock.resource("apps/v1/replicasets"): ScalePaths(),
    kmock.resource("apps/v1/statefulsets"): ScalePaths(),
}


class ApiError(kmock.KubernetesError):
    """A Kubernetes `Status` error with our own code, reason and message."""


@dataclass(frozen=True)
class _Target:
    key: tuple[kmock.resource, str | None, str]
    current: Json


class ClusterEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator plus the API-server behaviour kopf and our operator rely on (module doc)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.scale_paths: dict[kmock.resource, ScalePaths] = dict(BUILTIN_SCALE)
        self._versions = itertools.count(1)
        self.watchers: dict[kmock.resource, int] = {}
        self.custom_resources: set[kmock.resource] = set()

    # ------------------------------------------------------------------ writes

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.method.upper() == "PUT" and request.name:
            return await self._serve_put(request)
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._admit(request)
        try:
            response = await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
            raise ApiError(status=422, reason="Invalid", message=f"the JSON patch does not apply: {error}") from None
        except ValueError as error:  # kmock's merge of a dict into a scalar or the reverse
            if request.action == kmock.action.UPDATE:
                raise ApiError(status=422, reason="Invalid", message=str(error)) from None
            raise
        if request.action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)  # the client's create_*_custom_object reads only a 201's body
        return response

    def _admit(self, request: rendering.Request) -> None:
        """Rewrite the request body, in place, into what a real API server would store."""
        assert request.resource is not None
        data = request.data
        if request.action == kmock.action.CREATE:
            if not isinstance(data, dict):
                raise ApiError(status=400, reason="BadRequest", message="the body must be a JSON object")
            meta = data.setdefault("metadata", {})
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise ApiError(status=422, reason="Invalid", message="metadata.name: Required value")
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.update(
                uid=str(uuid.uuid4()),
                creationTimestamp=_now(),
                resourceVersion=str(next(self._versions)),
                generation=1,
            )
            meta.pop("deletionTimestamp", None)
            return

        target = self._target(request)
        if target is None:
            return  # kmock answers 404
        self._check_patch_type(request)
        if isinstance(data, dict):
            new = self._restrict_merge(request, target, data)
            data.clear()
            data.update(new)
        elif isinstance(data, list):
            data[:] = self._restrict_ops(request, target, data)
        else:
            raise ApiError(status=400, reason="BadRequest", message="the patch must be a JSON object or array")

    def _check_patch_type(self, request: rendering.Request) -> None:
        """Refuse what a real server refuses; kmock picks the patch type from the body's shape."""
        headers = {key.lower(): value for key, value in request.headers.items()}
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        is_list = isinstance(request.data, list)
        if content_type == "application/json-patch+json" and not is_list:
            raise ApiError(status=400, reason="BadRequest", message="a JSON patch must be an array of operations")
        if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json") and is_list:
            # e.g. CustomObjectsApi.patch_* sends a list of ops as merge-patch unless given
            # _content_type="application/json-patch+json".
            raise ApiError(
                status=400, reason="BadRequest", message=f"{content_type}: cannot unmarshal an array into an object"
            )
        if content_type == "application/strategic-merge-patch+json" and request.resource in self.custom_resources:
            raise ApiError(
                status=415,
                reason="UnsupportedMediaType",
                message="strategic merge patch is not supported for custom resources",
            )
        if content_type == "application/apply-patch+yaml":
            raise ApiError(status=415, reason="UnsupportedMediaType", message="server-side apply is not emulated")

    def _target(self, request: rendering.Request) -> _Target | None:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return _Target(key, copy.deepcopy(self.objects[key].raw))

    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _next_meta(self, request: rendering.Request, target: _Target, sent: Any, spec_touched: bool) -> Json:
        """resourceVersion (with optimistic concurrency) and generation for a write."""
        meta = target.current.get("metadata", {})
        if sent is not None and str(sent) != str(meta.get("resourceVersion")):
            raise ApiError(
                status=409,
                reason="Conflict",
                message=f"Operation cannot be fulfilled on {request.resource.plural} {request.name!r}: "
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        new = {"resourceVersion": str(next(self._versions))}
        if spec_touched:
            new["generation"] = int(meta.get("generation", 1)) + 1
        return new

    def _restrict_merge(self, request: rendering.Request, target: _Target, patch: Json) -> Json:
        assert request.resource is not None
        sent = (patch.get("metadata") or {}).get("resourceVersion")
        if request.subresource == "status":
            patch = {"status": patch["status"]} if "status" in patch else {}
        elif request.subresource == "scale":
            replicas = (patch.get("spec") or {}).get("replicas")
            patch = {} if replicas is None else _nested(self._scale_paths(request.resource).spec_replicas, replicas)
        elif request.subresource is None:
            if self._has_status(request.resource):
                patch = {k: v for k, v in patch.items() if k != "status"}
        else:
            raise ApiError(status=404, reason="NotFound", message=f"no subresource {request.subresource!r} here")
        spec_touched = "spec" in patch and request.subresource != "status"
        meta = self._next_meta(request, target, sent, spec_touched)
        patch = dict(patch)
        patch["metadata"] = {**(patch.get("metadata") or {}), **meta}
        return patch

    def _restrict_ops(self, request: rendering.Request, target: _Target, ops: list[Json]) -> list[Json]:
        assert request.resource is not None

        def under(op: Json, prefix: str) -> bool:
            return bool(op.get("path") == prefix or str(op.get("path", "")).startswith(prefix + "/"))

        if request.subresource == "status":
            kept = [op for op in ops if under(op, "/status") or under(op, "/metadata/resourceVersion")]
        elif request.subresource is None and self._has_status(request.resource):
            kept = [op for op in ops if not under(op, "/status")]
        elif request.subresource is None:
            kept = list(ops)
        else:
            raise ApiError(status=422, reason="Invalid", message="JSON patches to /scale are not supported here")
        spec_touched = any(under(op, "/spec") for op in kept)
        meta = self._next_meta(request, target, None, spec_touched)
        kept.append({"op": "add", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]})
        if "generation" in meta:
            kept.append({"op": "add", "path": "/metadata/generation", "value": meta["generation"]})
        return kept

    async def _serve_put(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """`replace_*`: kmock routes no PUT; store the new state and tell the watchers."""
        assert request.resource is not None and request.name is not None
        try:
            async with self._lock:
                target = self._target(request)
                if target is None:
                    raise kmock.KubernetesObjectNotFoundError()
                body = request.data if isinstance(request.data, dict) else {}
                sent = (body.get("metadata") or {}).get("resourceVersion")
                new = copy.deepcopy(target.current)
                if request.subresource == "status":
                    new["status"] = body.get("status")
                elif request.subresource == "scale":
                    paths = self._scale_paths(request.resource)
                    new = _merge(new, _nested(paths.spec_replicas, (body.get("spec") or {}).get("replicas")))
                elif request.subresource is None:
                    kept = {"status": new["status"]} if self._has_status(request.resource) and "status" in new else {}
                    immutable = {k: v for k, v in new["metadata"].items() if k in ("uid", "creationTimestamp")}
                    new = {**body, **kept}
                    new["metadata"] = {**body.get("metadata", {}), **immutable, "namespace": request.namespace}
                else:
                    raise kmock.KubernetesNotFoundError()
                spec_touched = request.subresource != "status" and new.get("spec") != target.current.get("spec")
                meta = self._next_meta(request, target, sent, spec_touched)
                new.setdefault("metadata", {}).update(meta)
                new["metadata"] = {k: v for k, v in new["metadata"].items() if v is not None}
                obj = self.objects[target.key]
                obj.history.append(new)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": copy.deepcopy(new)})
        except kmock.KubernetesError as error:
            return await self._render_error(error)
        if request.subresource == "scale":
            return aiohttp.web.json_response(self._as_scale(request.resource, new))
        return aiohttp.web.json_response(new)

    # ------------------------------------------------------------------ reads

    def _scale_paths(self, resource: kmock.resource) -> ScalePaths:
        if resource not in self.scale_paths:
            raise ApiError(status=404, reason="NotFound", message=f"{resource.plural} has no scale subresource")
        return self.scale_paths[resource]

    def _as_scale(self, resource: kmock.resource, obj: Json) -> Json:
        paths = self._scale_paths(resource)
        meta = obj.get("metadata", {})
        if paths.label_selector is not None:
            selector = _get(obj, paths.label_selector)
        else:
            match = (obj.get("spec") or {}).get("selector") or {}
            selector = ",".join(f"{k}={v}" for k, v in (match.get("matchLabels") or {}).items())
        status: Json = {"replicas": _get(obj, paths.status_replicas) or 0}
        if selector:
            status["selector"] = selector
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta
            },
            "spec": {"replicas": _get(obj, paths.spec_replicas) or 0},
            "status": status,
        }

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = await super()._serve_fetch(request)
        if request.subresource == "scale":
            assert request.resource is not None
            return self._as_scale(request.resource, obj)
        return obj

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        obj = await super()._serve_update(request)
        if request.subresource == "scale":
            assert request.resource is not None
            return self._as_scale(request.resource, obj)
        return obj

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listing = await super()._serve_list(request)
        match = _selector(request)
        listing["items"] = [item for item in listing["items"] if match(item)]
        listing["metadata"] = {"resourceVersion": self._current_version()}
        return listing

    def _current_version(self) -> str:
        return str(max((_version(o.raw) for o in self.objects.values() if not o.deleted), default=0))

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # send the headers now: a watch may stay silent for long
        assert request.resource is not None
        resource = request.resource
        match = _selector(request)
        timeout = float(request.params.get("timeoutSeconds", 0) or 0)
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        bus = self._buses[resource]
        marker = await bus.mark()  # subscribe BEFORE the replay: no change falls in between
        self.watchers[resource] = self.watchers.get(resource, 0) + 1
        try:
            # From a resourceVersion (kopf's: its listing's), replay only what changed since then,
            # as a real server does; kmock replayed all objects, handing kopf stale bodies that
            # it had already patched (its next patch then failed its resourceVersion test).
            since = str(request.params.get("resourceVersion") or "0")
            newer_than = int(since) if since.isdigit() else 0
            async with self._lock:
                replay = [
                    {"type": "ADDED", "object": obj.raw}
                    for (res, namespace, _), obj in self.objects.items()
                    if res == resource and not obj.deleted
                    if request.namespace is None or namespace == request.namespace
                    if _version(obj.raw) > newer_than
                ]
            for event in replay:
                if match(event["object"]):
                    yield event
            stream = bus.stream(since=marker)
            while True:
                if deadline is None:
                    event = await anext(stream)
                else:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        return
                    try:
                        event = await asyncio.wait_for(anext(stream), remaining)
                    except TimeoutError:
                        return
                obj = event.get("object", {})
                namespace = obj.get("metadata", {}).get("namespace")
                if request.namespace is not None and namespace != request.namespace:
                    continue
                if match(obj):
                    yield event
        finally:
            self.watchers[resource] -= 1
            with contextlib.suppress(ValueError):
                await bus.unmark(marker)


# ---------------------------------------------------------------------- selectors and paths

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    """Split on commas outside parentheses: `a in (x,y),b=c` -> two requirements."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _requirement(text: str) -> tuple[str, str, frozenset[str]]:
    """One label requirement as (key, operator, values), operator one of in/notin/exists/!exists."""
    if m := _SET_RE.match(text):
        return m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(","))
    if "!=" in text:
        key, value = (s.strip() for s in text.split("!=", 1))
        return key, "notin", frozenset([value])
    if "=" in text:
        key, value = (s.strip() for s in text.replace("==", "=").split("=", 1))
        return key, "in", frozenset([value])
    if text.startswith("!"):
        return text[1:].strip(), "!exists", frozenset()
    return text, "exists", frozenset()


def label_matcher(selector: str) -> Callable[[Mapping[str, str]], bool]:
    """A label selector string as the API server reads it, as a predicate on a labels dict."""
    requirements = [_requirement(text) for text in _split_selector(selector)]

    def holds(labels: Mapping[str, str], key: str, op: str, values: frozenset[str]) -> bool:
        if op == "in":
            return labels.get(key) in values
        if op == "notin":
            return labels.get(key) not in values
        return (key in labels) == (op == "exists")

    return lambda labels: all(holds(labels, *requirement) for requirement in requirements)


def _selector(request: rendering.Request) -> Callable[[Json], bool]:
    labels = label_matcher(request.params.get("labelSelector", ""))
    fields: list[tuple[str, str, bool]] = []
    for requirement in _split_selector(request.params.get("fieldSelector", "")):
        negate = "!=" in requirement
        key, value = (s.strip() for s in re.split(r"!=|==|=", requirement, maxsplit=1))
        if key in ("metadata.name", "metadata.namespace"):
            fields.append((key.split(".")[1], value, negate))

    def match(obj: Json) -> bool:
        meta = obj.get("metadata", {})
        if not labels(meta.get("labels") or {}):
            return False
        return all((meta.get(key) == value) != negate for key, value, negate in fields)

    return match


def _version(obj: Json) -> int:
    version = str(obj.get("metadata", {}).get("resourceVersion") or "0")
    return int(version) if version.isdigit() else 0


def _get(obj: Json, path: str) -> Any:
    node: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _nested(path: str, value: Any) -> Json:
    node: Any = value
    for part in reversed(path.strip(".").split(".")):
        node = {part: node}
    return dict(node)


def _merge(base: Json, patch: Json) -> Json:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------- the emulator in a thread


class Emulator:
    """A `ClusterEmulator` served over HTTP by its own event loop in a daemon thread.

    A thread, not the test's loop: the `kubernetes` client is synchronous, and a sync call from an
    async test (or from an async kopf handler) would block the very loop that must answer it.
    """

    def __init__(self) -> None:
        self.kmock = ClusterEmulator()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the kmock emulator did not start: {self._error!r}")

    def stop(self, timeout: float = 10.0) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the kmock emulator thread did not stop")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as error:
            self._error = error
            self._started.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.kmock, kmock.Server(self.kmock) as server:
            self.url = str(server.url).rstrip("/")
            self._started.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run `fn` in the emulator's loop (under its lock): safe access to kmock's state."""

        async def locked() -> Any:
            async with self.kmock._lock:
                return fn()

        return asyncio.run_coroutine_threadsafe(locked(), self._loop).result(timeout)

    def register_crd(self, crd: Json) -> None:
        """Serve a CRD's resource (discovery, subresources, scale paths) and store the CRD object."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            subresources = version.get("subresources") or {}
            self.kmock.custom_resources.add(resource)
            self.kmock.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec["scope"] == "Namespaced",
                verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(subresources),
            )
            if "scale" in subresources:
                scale = subresources["scale"]
                self.kmock.scale_paths[resource] = ScalePaths(
                    spec_replicas=scale["specReplicasPath"],
                    status_replicas=scale["statusReplicasPath"],
                    label_selector=scale.get("labelSelectorPath"),
                )
        stored = copy.deepcopy(crd)
        stored.setdefault("metadata", {}).update(uid=str(uuid.uuid4()), resourceVersion="0", generation=1)
        self.call(lambda: self.kmock.objects.__setitem__((kmock.resource(CRDS), None, crd["metadata"]["name"]), stored))

    def objects(self, resource: str, namespace: str | None = None) -> list[Json]:
        """Deep copies of the stored (not deleted) objects of a resource, e.g. `"v1/pods"`."""
        wanted = kmock.resource(resource)

        def snapshot() -> list[Json]:
            return [
                copy.deepcopy(obj.raw)
                for (res, ns, _), obj in self.kmock.objects.items()
                if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
            ]

        result: list[Json] = self.call(snapshot)
        return result

    @property
    def requests(self) -> list[rendering.Request]:
        """kmock's log of every request served (for assertions on what was called)."""
        return list(self.kmock._requests)


@contextlib.contextmanager
def emulator_running(crds: Collection[Json] = ()) -> Iterator[Emulator]:
    """An `Emulator` with the bundled built-in resources and our CRD (plus `crds`) registered."""
    emulator = Emulator()
    emulator.kmock.resources.load_bundled()
    emulator.start()
    try:
        for crd in [build_crd(), *crds]:
            emulator.register_crd(crd)
        yield emulator
    finally:
        emulator.stop()


def api_client_for(emulator: Emulator) -> client.ApiClient:
    """A `kubernetes` ApiClient for the emulator: plain HTTP, no credentials, no proxy."""
    configuration = client.Configuration(host=emulator.url, no_proxy="127.0.0.1,localhost")
    configuration.verify_ssl = False
    return client.ApiClient(configuration)


@pytest.fixture
def k8s_emulator() -> Iterator[Emulator]:
    with emulator_running() as emulator:
        yield emulator


@pytest.fixture
def k8s_api(k8s_emulator: Emulator) -> Iterator[client.ApiClient]:
    api = api_client_for(k8s_emulator)
    try:
        yield api
    finally:
        api.close()


# ---------------------------------------------------------------------- kopf against the emulator


def fast_settings() -> kopf.OperatorSettings:
    """kopf settings for tests: short timeouts and backoffs, no dynamic scanning of CRDs."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # resources are discovered once, at start-up
    settings.watching.reconnect_backoff = 0.1
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 10
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 2
    settings.background.cancellation_timeout = 2
    settings.posting.level = 0  # post every kopf.event(), whatever its type
    return settings


@dataclass
class Operator:
    """A kopf operator running as a task in the test's loop (see `running_operator`)."""

    task: asyncio.Task[None]
    registry: kopf.OperatorRegistry
    settings: kopf.OperatorSettings
    memo: Any
    stop_flag: asyncio.Event = field(repr=False)

    @property
    def running(self) -> bool:
        return not self.task.done()


@contextlib.asynccontextmanager
async def running_operator(
    emulator: Emulator,
    registry: kopf.OperatorRegistry,
    *,
    namespaces: Collection[str] = (),
    settings: kopf.OperatorSettings | None = None,
    memo: Any = None,
    timeout: float = 5.0,
) -> AsyncIterator[Operator]:
    """Run kopf with `registry` against `emulator` for the block (see the module docstring)."""
    settings = settings if settings is not None else fast_settings()
    memo = memo if memo is not None else kopf.Memo()
    stop_flag, ready_flag = asyncio.Event(), asyncio.Event()
    insights = Insights()  # kopf's own record of what it watches: for the readiness check

    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=emulator.url, default_namespace="default", priority=10**6)

    kopf.on.login(registry=registry, id="tests.support.k8s:login")(login)
    handler = registry._activities._handlers[-1]
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            memo=memo,
            insights=insights,
            standalone=True,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        ),
        name="kopf-operator-under-test",
    )
    operator = Operator(task=task, registry=registry, settings=settings, memo=memo, stop_flag=stop_flag)
    try:
        await _until_watching(operator, ready_flag, insights, emulator, timeout)
        yield operator
    finally:
        stop_flag.set()
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise AssertionError(f"kopf did not stop within {timeout} s of its stop flag")
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        finally:
            with contextlib.suppress(ValueError):
                registry._activities._handlers.remove(handler)


async def _until_watching(
    operator: Operator, ready_flag: asyncio.Event, insights: Any, emulator: Emulator, timeout: float
) -> None:
    """Ready means: kopf said so, and every resource it serves has an open watch at the emulator."""

    async def ready() -> bool:
        if operator.task.done():
            operator.task.result()  # re-raise why kopf failed to start
            raise AssertionError("kopf exited during start-up")
        if not ready_flag.is_set() or not insights.ready_resources.is_set():
            return False
        watched = {kmock.resource(r.group, r.version, r.plural) for r in insights.watched_resources}
        return all(emulator.kmock.watchers.get(r, 0) > 0 for r in watched)

    await wait_for_async(ready, timeout=timeout, interval=0.02)


# ---------------------------------------------------------------------- object helpers


def _custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def apply_pool(api: client.ApiClient, manifest: Mapping[str, Any], namespace: str | None = None) -> Json:
    """Create the CeleryWorkerPool, or merge-patch it if it exists (like `kubectl apply`, roughly)."""
    body = copy.deepcopy(dict(manifest))
    body.setdefault("apiVersion", f"{GROUP}/{VERSION}")
    body.setdefault("kind", KIND)
    namespace = namespace or body.get("metadata", {}).get("namespace") or "default"
    body.setdefault("metadata", {})["namespace"] = namespace
    name = body["metadata"]["name"]
    try:
        result: Json = _custom(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except client.ApiException as error:
        if error.status != 409:
            raise
        result = _custom(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)
    return result


def read_pool(api: client.ApiClient, name: str, namespace: str = "default") -> Json:
    pool: Json = _custom(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return pool


def events_for(api: client.ApiClient, name: str, namespace: str = "default", kind: str | None = None) -> list[Json]:
    """The core/v1 Events whose involvedObject is `name` (and `kind`), oldest first, as dicts."""
    listing = client.CoreV1Api(api).list_namespaced_event(namespace, _preload_content=False)
    items: list[Json] = json.loads(listing.data)["items"]
    return sorted(
        (
            e
            for e in items
            if e.get("involvedObject", {}).get("name") == name
            if kind is None or e.get("involvedObject", {}).get("kind") == kind
        ),
        key=lambda e: int(e["metadata"].get("resourceVersion") or 0),
    )


def pods_labelled(api: client.ApiClient, namespace: str, labels: Mapping[str, str]) -> list[client.V1Pod]:
    """Pods with all `labels`, by a server-side label selector (which this emulator honours)."""
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods: list[client.V1Pod] = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items
    return pods


__all__ = [
    "CRDS",
    "DEPLOYMENTS",
    "EVENTS",
    "GROUP",
    "KIND",
    "PLURAL",
    "PODS",
    "POOLS",
    "SECRETS",
    "VERSION",
    "ClusterEmulator",
    "Emulator",
    "Operator",
    "api_client_for",
    "apply_pool",
    "emulator_running",
    "events_for",
    "fast_settings",
    "k8s_api",
    "k8s_emulator",
    "label_matcher",
    "pods_labelled",
    "read_pool",
    "running_operator",
    "wait_for",
]
