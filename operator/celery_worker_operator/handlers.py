"""kopf adapters, a few lines each: they parse and hand over to the pool loop (kube.py).

`registry` holds every handler, so `celery-worker-operator run` and the tests start the same
operator; kopf's `memo` is the `Operator` that holds one loop per pool.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from .kube import Operator
from .manifests import InvalidPool, parse_pool
from .spec import GROUP, PLURAL, VERSION, CeleryWorkerPool
from .workloads.kubernetes import DeploymentView, DeploymentViews, view_of

PREFIX = "celery-operator.dev"
# Seconds between retries of a failed API call (429, 5xx, a dropped connection). kopf's default
# gives up after ~55 s and a watch that gives up stops the whole operator: a minute of API errors
# (an overloaded or upgrading control plane) would restart it and throw away every pool's windows.
# These ride out ~6 minutes, and try again every 10 s at most; longer, and the exit (and the pod's
# restart) is the right answer.
API_ERROR_BACKOFFS = (1, 1, 2, 3, 5, 8, *(10,) * 35)
registry = kopf.OperatorRegistry()


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Our own annotation and finalizer names; kopf's log lines are not turned into Events; API errors
    are retried for minutes, not seconds."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = API_ERROR_BACKOFFS


@kopf.on.startup(registry=registry)
def watch_deployments(memo: Operator, **indices: Any) -> None:
    """Passes read Deployments from the watch below, not with a GET each: kopf fills the index before
    any pool handler or daemon starts, and keeps it current as events arrive."""
    deployments: DeploymentViews = indices["deployments"]
    memo.deployments = deployments


@kopf.index("apps", "v1", "deployments", id="deployments", registry=registry)
async def index_deployment(body: kopf.Body, **_: Any) -> dict[tuple[str, str], DeploymentView]:
    """Every watched Deployment by (namespace, name), as a small view; async: runs in kopf's loop, no thread."""
    view = view_of(body)
    return {(view.namespace, view.name): view}


@kopf.on.cleanup(registry=registry)
def release(memo: Operator, **_: Any) -> None:
    memo.close()


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster or kubeconfig credentials; none (not an error) lets another login handler answer."""
    try:
        return kopf.login_via_client(**kwargs)
    except kopf.LoginError:
        return None


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
def ensure_workload(body: kopf.Body, memo: Operator, **_: Any) -> None:
    """Apply the managed Deployment; adopted ones are left to their owners."""
    memo.ensure_workload(_parse(body, memo), body)


@kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10, backoff=10)
async def pool_loop(stopped: kopf.DaemonStopped, body: kopf.Body, memo: Operator, **_: Any) -> None:
    """The pool's loop until kopf stops it; async: it waits in kopf's event loop and lends its passes
    to the operator's pass threads. `body` is kopf's live view, so spec edits apply. A pass still under
    way when the delete handler ran took the broker again: let go of it here too, after that pass."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        await memo.loop(body).run(stopped, lambda: body, memo.loop_threads)
    finally:
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            await asyncio.get_running_loop().run_in_executor(memo.threads, memo.forget, namespace, name)


@kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, optional=True)
def forget(body: kopf.Body, memo: Operator, **_: Any) -> None:
    memo.forget(body["metadata"]["namespace"], body["metadata"]["name"])


def _parse(body: kopf.Body, memo: Operator) -> CeleryWorkerPool:
    """The pool, or a permanent error: the pool loop reports the same problems as InvalidSpec."""
    try:
        return parse_pool(dict(body), memo.template_policy)
    except InvalidPool as invalid:
        raise kopf.PermanentError(str(invalid)) from None
