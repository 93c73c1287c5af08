"""Pools on Kubernetes: the worker Deployment (built by pure functions, compared as dicts in tests)
and the adapter that reads and scales it with the `kubernetes` client.

Everything written to a Deployment is a server-side apply under one field manager,
`celery-worker-operator`: the managed Deployment's fields from `worker.template` and the rest of
the generated manifest (a field dropped from the template leaves the Deployment with the next apply),
and the replica count through the `/scale` subresource, for managed and adopted Deployments alike.
The count is applied with force over imperative writers (`kubectl scale`, `kubectl edit`, a
client-side apply, the fields a Deployment had before any apply): they wrote once, the pool owns
it from then on. It is never forced over another manager that *applies* it (Argo CD, Flux, Helm 4
with server-side apply): that manager would take it back on its next sync and the two would
fight; the pool reports the conflict instead (README, "GitOps").

Scale-down never picks a busy worker on purpose: before lowering replicas, each pod gets
`controller.kubernetes.io/pod-deletion-cost` = its busy + reserved tasks, and the ReplicaSet
removes the cheapest ready pods first.

A pass reads its Deployment from the operator's watch of Deployments (`DeploymentView`s kept by kopf's
index, fresh within milliseconds of a change) instead of one GET per pool per pass; a Deployment the
watch has not seen (just created, or absent) is read with a GET, as are the reads before a write.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..spec import API_VERSION, KIND, BrokerTLS, CeleryWorkerPool, ValueFrom
from ..urls import PASSWORD_ENV, USERNAME_ENV, tls_settings, with_credentials
from . import FieldConflict, WorkloadMissing, WorkloadNotOwned, WorkloadState
from .command import concurrency_from_args, grace_seconds, worker_args

FIELD_MANAGER = "celery-worker-operator"
APPLY = "application/apply-patch+yaml"  # server-side apply; the client sends the body as JSON, which is YAML
POOL_LABEL = "celery-operator.dev/pool"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
BROKER_ENV = "CELERY_BROKER_URL"
CONTAINER = "worker"
TLS_VOLUME = "celery-broker-tls"
TLS_DIR = "/etc/celery-broker-tls"
TLS_FILES = {"ca_from": "ca.crt", "cert_from": "tls.crt", "key_from": "tls.key"}  # BrokerTLS field -> file


def pool_labels(pool: CeleryWorkerPool) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "celery-worker",
        "app.kubernetes.io/instance": pool.metadata.name,
        "app.kubernetes.io/managed-by": "celery-worker-operator",
        POOL_LABEL: pool.metadata.name,
    }


def broker_env(pool: CeleryWorkerPool) -> list[dict[str, Any]]:
    """The broker URL for the workers: credentials come from their Secrets, so they never sit in the
    manifest. A URL completed with usernameFrom/passwordFrom is put together in the pod by `$(VAR)`
    expansion, which needs the variables it reads defined before it."""
    broker = pool.spec.broker
    if broker.url_from is not None:
        return [_from_secret(BROKER_ENV, broker.url_from)]
    assert broker.url is not None
    credentials = ((USERNAME_ENV, broker.username_from), (PASSWORD_ENV, broker.password_from))
    env = [_from_secret(name, source) for name, source in credentials if source is not None]
    username = f"$({USERNAME_ENV})" if broker.username_from else None
    password = f"$({PASSWORD_ENV})" if broker.password_from else None
    return [*env, {"name": BROKER_ENV, "value": with_credentials(broker.url, username, password, encode=False)}]


def _from_secret(name: str, source: ValueFrom) -> dict[str, Any]:
    ref = source.secret_key_ref
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def tls_volume(tls: BrokerTLS) -> dict[str, Any]:
    """The broker's CA, certificate and key as files in one read-only volume, from whichever Secrets
    hold them (one projected source per Secret)."""
    items: dict[str, list[dict[str, str]]] = {}
    for field_name, path in TLS_FILES.items():
        source: ValueFrom | None = getattr(tls, field_name)
        if source is not None:
            ref = source.secret_key_ref
            items.setdefault(ref.name, []).append({"key": ref.key, "path": path})
    sources = [{"secret": {"name": name, "items": files}} for name, files in items.items()]
    return {"name": TLS_VOLUME, "projected": {"sources": sources}}


def tls_arg(tls: BrokerTLS) -> str:
    """Celery's `broker_use_ssl` pointing at the mounted files, as a trailing setting: it applies to the
    URL from url and from urlFrom alike (neither sets ssl_* parameters, which would override it)."""
    ca, cert, key = (f"{TLS_DIR}/{path}" if getattr(tls, name) else None for name, path in TLS_FILES.items())
    return f"broker_use_ssl=(json){json.dumps(tls_settings(ca, cert, key), separators=(',', ':'))}"


def crash_loop(pods: Iterable[Any]) -> str | None:
    """The first container waiting in CrashLoopBackOff, with the exit code and termination message
    of its last run (the end of its log, with `FallbackToLogsOnError`); None when none is."""
    for pod in pods:
        for container in (pod.status.container_statuses if pod.status else None) or []:
            waiting = container.state.waiting if container.state else None
            if waiting is None or waiting.reason != "CrashLoopBackOff":
                continue
            last = container.last_state.terminated if container.last_state else None
            said = " | ".join(line for line in (last.message or "").splitlines() if line.strip()) if last else ""
            return (
                f"pod {pod.metadata.name} exited with {last.exit_code if last else '?'} "
                f"({container.restart_count} restarts): {said or 'no termination message'}"
            )
    return None


def created(pods: Iterable[Any]) -> dict[str, float]:
    """When each pod was created, seconds since the epoch: where its worker's start-up begins. The API
    server keeps whole seconds, so a start-up measured from it may be up to a second long."""
    return {p.metadata.name: p.metadata.creation_timestamp.timestamp() for p in pods if p.metadata.creation_timestamp}


def build_deployment(pool: CeleryWorkerPool, uid: str, replicas: int) -> dict[str, Any]:
    """The managed worker Deployment for a pool with `spec.worker`."""
    worker = pool.spec.worker
    if worker is None:
        raise ValueError(f"pool {pool.metadata.name} adopts a Deployment; it has no managed one")
    labels = pool_labels(pool)
    tls = pool.spec.broker.tls
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": worker.image,
        "command": ["celery"],
        "args": [*worker_args(pool.identity, "$(POD_NAME)", pool.spec, worker), *([tls_arg(tls)] if tls else [])],
        # A worker that cannot start (a typo in the app) leaves Celery's reason in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            *broker_env(pool),
        ],
    }
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": grace_seconds(pool.spec), "containers": [container]}
    if tls is not None:
        container["volumeMounts"] = [{"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True}]
        pod["volumes"] = [tls_volume(tls)]
    template = {"metadata": {"labels": labels}, "spec": pod}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": pool.metadata.name,
            "namespace": pool.metadata.namespace,
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": pool.metadata.name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {POOL_LABEL: pool.metadata.name}},
            "template": merge_template(template, worker.template),
        },
    }


def merge_template(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`: maps merge deeply, lists of named items merge by name, others replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge_template(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list) and _named(value + merged[key]):
            by_name = {item["name"]: item for item in merged[key]}
            for item in value:
                by_name[item["name"]] = merge_template(by_name.get(item["name"], {}), item)
            merged[key] = list(by_name.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _named(items: list[Any]) -> bool:
    return all(isinstance(item, Mapping) and "name" in item for item in items)


def replicas_declared_by(managed_fields: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The other field managers that apply `spec.replicas` (server-side apply, not a one-off update),
    from a Deployment's `metadata.managedFields`."""
    return tuple(
        sorted(
            {
                str(entry.get("manager"))
                for entry in managed_fields
                if entry.get("operation") == "Apply"
                and entry.get("manager") != FIELD_MANAGER
                and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
            }
        )
    )


def conflicting_managers(status: Mapping[str, Any]) -> dict[str, list[str]]:
    """Manager -> fields, from the API server's 409 answer to an apply (`details.causes`)."""
    found: dict[str, list[str]] = {}
    for cause in (status.get("details") or {}).get("causes") or []:
        named = re.match(r'conflict with "([^"]+)"', cause.get("message", ""))
        if named:
            found.setdefault(named.group(1), []).append(cause.get("field", "?"))
    return found


def applying_managers(managed_fields: Iterable[Mapping[str, Any]]) -> set[str]:
    """Managers that hold fields by server-side apply (as opposed to one-off updates)."""
    return {str(entry.get("manager")) for entry in managed_fields if entry.get("operation") == "Apply"}


@dataclass(frozen=True)
class DeploymentView:
    """What the operator reads of a Deployment, small enough to keep one for every Deployment watched."""

    namespace: str
    name: str
    replicas: int
    ready_replicas: int
    pods_expected: bool  # spec or status counts replicas: a Deployment at zero has no pods to list
    match_labels: tuple[tuple[str, str], ...]
    commands: tuple[tuple[str, ...], ...]  # each container's command + args
    controller: tuple[str, str, str] | None  # (apiVersion, kind, name) of the controlling owner
    appliers: tuple[str, ...]  # managers that hold fields by server-side apply
    replicas_declared_by: tuple[str, ...]

    def controlled_by(self, pool_name: str) -> bool:
        """True when the pool named `pool_name` is the Deployment's controller (build_deployment sets it so)."""
        return self.controller == (API_VERSION, KIND, pool_name)


DeploymentViews = Mapping[tuple[str, str], Iterable[DeploymentView]]  # (namespace, name) -> views (kopf's index)


def view_of(deployment: Mapping[str, Any]) -> DeploymentView:
    """The view of a Deployment as the API serves it (JSON: a watch event's object or a GET's body)."""
    meta, spec, status = deployment["metadata"], deployment.get("spec") or {}, deployment.get("status") or {}
    managed = meta.get("managedFields") or []
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    controller = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
    return DeploymentView(
        namespace=meta.get("namespace", ""),
        name=meta["name"],
        replicas=spec.get("replicas") or 0,
        ready_replicas=status.get("readyReplicas") or 0,
        pods_expected=bool(spec.get("replicas") or status.get("replicas")),
        match_labels=tuple(sorted(((spec.get("selector") or {}).get("matchLabels") or {}).items())),
        commands=tuple((*(c.get("command") or []), *(c.get("args") or [])) for c in containers),
        controller=(controller["apiVersion"], controller["kind"], controller["name"]) if controller else None,
        appliers=tuple(sorted(applying_managers(managed))),
        replicas_declared_by=replicas_declared_by(managed),
    )


def scale_body(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    """An apply configuration of a Deployment's `/scale` subresource: the replica count and nothing else."""
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    }


class KubernetesWorkload:
    """One pool's Deployment: the managed one (named after the pool) or the adopted one."""

    def __init__(
        self,
        api: client.ApiClient,
        pool: CeleryWorkerPool,
        watched: DeploymentViews | None = None,
        owner_uid: str | None = None,
    ) -> None:
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.pool = pool
        self.watched: DeploymentViews = watched if watched is not None else {}
        self.owner_uid = owner_uid  # the pool's uid: a managed Deployment found missing is applied again
        self.namespace = pool.metadata.namespace
        ref = pool.spec.scale_target_ref
        self.name = ref.name if ref is not None else pool.metadata.name

    def ensure(self, uid: str) -> None:
        """Apply the managed Deployment as the spec builds it now; a new one then gets its first
        replica count through `/scale`, the only place the count is ever applied from. Raises
        FieldConflict when another manager applies one of its fields with another value."""
        if self.pool.spec.worker is None:
            return
        spec = self.pool.spec
        wanted: Any = build_deployment(self.pool, uid, 0)  # the client takes plain dicts as bodies
        del wanted["spec"]["replicas"]  # owned through /scale: in this apply it would conflict with that
        try:
            self._read()
            new = False
        except WorkloadNotOwned:
            raise
        except WorkloadMissing:
            new = True
        self._apply(wanted)
        if new:
            replicas = spec.replicas if spec.replicas is not None else spec.autoscaling.min_replicas
            self._apply_scale(replicas)

    def _apply(self, manifest: Any) -> None:
        """Server-side apply; on a conflict, force only when no conflicting manager applies its fields."""
        try:
            self.apps.patch_namespaced_deployment(
                self.name, self.namespace, manifest, field_manager=FIELD_MANAGER, _content_type=APPLY
            )
            return
        except ApiException as error:
            if error.status != 409:
                raise
            conflicts = conflicting_managers(json.loads(error.body or "{}"))
        declaring = sorted(set(self._read().appliers) & set(conflicts))
        if declaring:
            fields = ", ".join(f"{field} ({manager})" for manager in declaring for field in conflicts[manager])
            raise FieldConflict(
                f"Deployment {self.namespace}/{self.name}: {fields} applied by another manager with another value; "
                f"the operator does not force it: remove these fields from that manager's manifest"
            )
        self.apps.patch_namespaced_deployment(
            self.name, self.namespace, manifest, field_manager=FIELD_MANAGER, _content_type=APPLY, force=True
        )

    def _apply_scale(self, replicas: int) -> None:
        """The replica count through `/scale`, forced over imperative writers (the reconciler does not
        call this while another manager applies the count: `replicas_declared_by`)."""
        body: Any = scale_body(self.namespace, self.name, replicas)
        self.apps.patch_namespaced_deployment_scale(
            self.name, self.namespace, body, field_manager=FIELD_MANAGER, _content_type=APPLY, force=True
        )

    def observe(self) -> WorkloadState:
        deployment = self._watched() or self._read_or_reapply()
        match = dict(deployment.match_labels)
        pods = self._pods(match) if deployment.pods_expected else []  # scaled to zero: no pods
        return WorkloadState(
            replicas=deployment.replicas,
            ready_replicas=deployment.ready_replicas,
            members=tuple(sorted(p.metadata.name for p in pods)),
            concurrency=self._concurrency(deployment.commands),
            selector=",".join(f"{k}={v}" for k, v in deployment.match_labels),
            crash_loop=crash_loop(pods),
            replicas_declared_by=deployment.replicas_declared_by,
            started=created(pods),
        )

    def scale(self, replicas: int, load: Mapping[str, int]) -> None:
        current = self._read().replicas
        if replicas < current:
            self._mark_deletion_costs(load)
        self._apply_scale(replicas)

    def _mark_deletion_costs(self, load: Mapping[str, int]) -> None:
        """Cheap pods go first: the cost of a pod is the work it would lose (busy + reserved tasks)."""
        for member, tasks in load.items():
            body = {"metadata": {"annotations": {DELETION_COST: str(tasks)}}}
            try:
                self.core.patch_namespaced_pod(member, self.namespace, body)
            except ApiException as error:
                if error.status != 404:  # a pod that went away on its own needs no mark
                    raise

    def _watched(self) -> DeploymentView | None:
        """The Deployment as the watch saw it last, if it did and the pool may use it."""
        found = list(self.watched.get((self.namespace, self.name), ()))  # list(): one step, while kopf updates
        return self._owned(found[0]) if found else None

    def _read_or_reapply(self) -> DeploymentView:
        """The Deployment; a managed one that is not there is applied first. A new pool's first pass
        can come before its create handler has applied it, and a managed Deployment someone deleted
        must come back as a ReplicaSet's pods do: neither is a missing workload to report."""
        try:
            return self._read()
        except WorkloadNotOwned:
            raise
        except WorkloadMissing:
            if self.pool.spec.worker is None or self.owner_uid is None:
                raise
        self.ensure(self.owner_uid)
        return self._read()

    def _read(self) -> DeploymentView:
        """The Deployment as the API server has it now (WorkloadMissing, or WorkloadNotOwned: see `_owned`)."""
        try:
            response: Any = self.apps.read_namespaced_deployment(self.name, self.namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                raise WorkloadMissing(f"Deployment {self.namespace}/{self.name} not found") from None
            raise
        return self._owned(view_of(json.loads(response.data)))

    def _owned(self, deployment: DeploymentView) -> DeploymentView:
        """The Deployment; a managed pool's only if the pool controls it (WorkloadNotOwned otherwise)."""
        if self.pool.spec.worker is not None and not deployment.controlled_by(self.pool.metadata.name):
            raise WorkloadNotOwned(
                f"Deployment {self.namespace}/{self.name} exists and is not this pool's (no controller reference "
                f"to {KIND} {self.pool.metadata.name}): the operator will not take it over; rename the pool, "
                "or adopt the Deployment with scaleTargetRef"
            )
        return deployment

    def _pods(self, match: Mapping[str, str]) -> list[Any]:
        selector = ",".join(f"{k}={v}" for k, v in match.items())
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        # Filtered here too: a selector the server ignored must not make us mark other pods.
        return [p for p in pods if p.metadata and all((p.metadata.labels or {}).get(k) == v for k, v in match.items())]

    def _concurrency(self, commands: Iterable[tuple[str, ...]]) -> int | None:
        if self.pool.spec.worker is not None:
            return self.pool.spec.worker.concurrency
        for command in commands:
            found = concurrency_from_args(list(command))
            if found is not None:
                return found
        return None
