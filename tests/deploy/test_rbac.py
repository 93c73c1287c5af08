"""RBAC equals what the operator does: every API call in the code is allowed, and nothing else is.

The calls are found by reading the package's source (AST), so a new call fails here until both the
table below and the chart's roles cover it. Three sources of calls:
- the `kubernetes` client: each `*Api` method called, mapped through CLIENT_CALLS;
- kopf, for each resource a `@kopf.on.*` / `@kopf.daemon` / `@kopf.timer` handler serves: list and
  watch it, patch it (finalizer and progress annotations), post Events (`kopf.event` and its own);
- the framework's standing needs, in FRAMEWORK below (CRD observation, peering, namespaces).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from celery_worker_operator import spec

from .chart import COMBINATIONS, NAMESPACE, manifests, of_kind

PACKAGE = Path(spec.__file__).parent
Rule = tuple[str, str, str]  # (apiGroup, resource, verb)
POOLS = (spec.GROUP, spec.PLURAL)

# Every kubernetes-client method the operator may call, and the permissions it needs.
CLIENT_CALLS: dict[str, set[Rule]] = {
    "read_namespaced_deployment": {("apps", "deployments", "get")},
    # A server-side apply that finds no Deployment creates it: the API server asks for create too.
    "patch_namespaced_deployment": {("apps", "deployments", "patch"), ("apps", "deployments", "create")},
    "patch_namespaced_deployment_scale": {("apps", "deployments/scale", "patch")},
    "list_namespaced_pod": {("", "pods", "list")},
    "patch_namespaced_pod": {("", "pods", "patch")},
    "read_namespaced_secret": {("", "secrets", "get")},
    "create_namespaced_event": {("", "events", "create")},
    # CustomObjectsApi names the resource in its arguments: only our pools are expected (checked below).
    "patch_namespaced_custom_object_status": {(spec.GROUP, f"{spec.PLURAL}/status", "patch")},
}
CUSTOM_OBJECT_ARGS = {"patch_namespaced_custom_object_status": (0, 3)}  # positions of group and plural
KOPF_HANDLERS = {"resume", "create", "update", "delete", "field", "event", "daemon", "timer", "index"}
KOPF_EVENTS = {"event", "info", "warn", "exception"}
EVENTS: Rule = ("", "events", "create")
# Set by the API server's OwnerReferencesPermissionEnforcement for `blockOwnerDeletion: True` owner
# references on what we create (the worker Deployment): update on the owner's finalizers.
OWNER_FINALIZERS: Rule = (spec.GROUP, f"{spec.PLURAL}/finalizers", "update")


def framework(values: dict[str, Any]) -> dict[str, set[Rule]]:
    """kopf's own needs by scope ("cluster" or "namespaced"), per chart mode."""
    cluster_wide = values.get("watch", {}).get("clusterWide", True)
    needs = {
        # the resource observer watches CRDs in every mode (and degrades to a warning without it)
        "cluster": {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")},
        "namespaced": {EVENTS},  # kopf posts Events of handler failures itself
    }
    if not cluster_wide:  # the namespace observer lists and watches namespaces unless cluster-wide
        needs["cluster"] |= {("", "namespaces", v) for v in ("list", "watch")}
    if values.get("peering", {}).get("enabled"):
        resource = "clusterkopfpeerings" if cluster_wide else "kopfpeerings"
        needs["cluster" if cluster_wide else "namespaced"] |= {
            ("kopf.dev", resource, v) for v in ("list", "watch", "patch", "get")
        }
    return needs


# Modules whose API calls a person makes with their own kubeconfig (`status`), never the operator:
# the chart grants them nothing, and they may only read.
PERSON_MODULES = {PACKAGE / "kube_status.py"}
READ_VERBS = ("read_", "list_")


def sources(modules: str = "operator") -> Iterator[tuple[Path, ast.AST]]:
    """The operator's modules, or (`modules="person"`) those only a person's commands run."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if (path in PERSON_MODULES) == (modules == "person"):
            yield path, ast.parse(path.read_text(), str(path))


RESOURCE_VERBS = ("read_", "list_", "create_", "patch_", "replace_", "delete_", "connect_")


def client_methods() -> set[str]:
    """Resource methods of the kubernetes client's API classes (to tell an API call from `read_text`).

    Their other methods (`get_api_resources`, `close`) are discovery or plumbing: no RBAC applies.
    """
    return {
        name
        for cls_name in dir(kubernetes.client)  # attributes load lazily: vars() would miss them
        if cls_name.endswith("Api") and inspect.isclass(cls := getattr(kubernetes.client, cls_name))
        for name, _ in inspect.getmembers(cls, inspect.isfunction)
        if name.startswith(RESOURCE_VERBS)
    }


def constant(node: ast.expr) -> str | None:
    """A string literal, or a name of spec.py's constants (GROUP, PLURAL...)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and isinstance(getattr(spec, node.id, None), str):
        return str(getattr(spec, node.id))
    return None


def kopf_attr(node: ast.expr) -> str | None:
    """`kopf.on.create` -> "create", `kopf.daemon` -> "daemon", `kopf.event` -> "event"."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "kopf":
        return parts[0]
    return None


def code_rules() -> set[Rule]:
    """Every permission the code's own calls need, found in the source."""
    methods, rules = client_methods(), set()
    for path, tree in sources():
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            rules |= client_call(path, call, methods) | kopf_call(call)
        if any(isinstance(n, ast.Constant) and n.value == "blockOwnerDeletion" for n in ast.walk(tree)):
            rules.add(OWNER_FINALIZERS)
    return rules


def client_call(path: Path, call: ast.Call, methods: set[str]) -> set[Rule]:
    if not isinstance(call.func, ast.Attribute) or call.func.attr not in methods:
        return set()
    name = call.func.attr
    where = f"{path.name}:{call.lineno}"
    assert name in CLIENT_CALLS, f"{where} calls {name}: add it to CLIENT_CALLS and to the chart's roles"
    if name in CUSTOM_OBJECT_ARGS:
        group_at, plural_at = CUSTOM_OBJECT_ARGS[name]
        target = (constant(call.args[group_at]), constant(call.args[plural_at]))
        assert target == POOLS, f"{where}: {name} on {target}, not on CeleryWorkerPools: extend the table"
    return CLIENT_CALLS[name]


def kopf_call(call: ast.Call) -> set[Rule]:
    kind = kopf_attr(call.func)
    if kind in KOPF_EVENTS:
        return {EVENTS}
    if kind not in KOPF_HANDLERS:
        return set()
    args = [constant(a) for a in call.args]
    group, plural = (args[0], args[-1]) if len(args) > 1 else ("", args[0] if args else None)
    assert plural is not None, f"kopf handler at line {call.lineno}: resource not given as literals or spec names"
    return {(group or "", plural, verb) for verb in ("list", "watch", "patch")}


def granted(values: dict[str, Any]) -> dict[str, set[Rule]]:
    """The chart's rules for the operator's ServiceAccount, by scope: "cluster", or each namespace."""
    objects = manifests(values)
    roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in objects if "rules" in r}
    by_scope: dict[str, set[Rule]] = {}
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        ref, namespace = binding["roleRef"], binding["metadata"].get("namespace")
        role = roles[ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"]]
        (subject,) = binding["subjects"]
        assert (subject["kind"], subject["namespace"]) == ("ServiceAccount", NAMESPACE)
        scope = namespace or "cluster"
        by_scope.setdefault(scope, set()).update(
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        )
    return by_scope


def expected(values: dict[str, Any]) -> dict[str, set[Rule]]:
    needs = framework(values)
    namespaced = code_rules() | needs["namespaced"]
    if values.get("watch", {}).get("clusterWide", True):
        return {"cluster": needs["cluster"] | namespaced}
    namespaces = values["watch"].get("namespaces") or [NAMESPACE]
    return {"cluster": needs["cluster"]} | {namespace: namespaced for namespace in namespaces}


RBAC_COMBINATIONS = {name: values for name, values in COMBINATIONS.items() if name != "no-rbac"}


@pytest.mark.parametrize("values", list(RBAC_COMBINATIONS.values()), ids=list(RBAC_COMBINATIONS))
def test_roles_grant_exactly_what_the_operator_calls(values: dict[str, Any]) -> None:
    want, have = expected(values), granted(values)
    for scope in want.keys() | have.keys():
        missing, extra = (
            want.get(scope, set()) - have.get(scope, set()),
            have.get(scope, set()) - want.get(scope, set()),
        )
        assert not missing and not extra, f"{scope}: missing {sorted(missing)}, not used {sorted(extra)}"


def test_a_persons_commands_only_read() -> None:
    methods = client_methods()
    calls = [
        (path.name, call.lineno, call.func.attr)
        for path, tree in sources("person")
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in methods
    ]
    assert {name for _, _, name in calls} >= {"list_namespaced_event", "list_event_for_all_namespaces"}
    assert [c for c in calls if not c[2].startswith(READ_VERBS)] == []


def test_the_scan_sees_the_calls_we_know_of() -> None:
    """Guards the scanner itself: if it found nothing, the equality above would prove little."""
    found = code_rules()
    assert ("apps", "deployments/scale", "patch") in found
    assert (spec.GROUP, spec.PLURAL, "watch") in found
    assert EVENTS in found


def test_without_rbac_no_roles_are_rendered() -> None:
    objects = manifests(COMBINATIONS["no-rbac"])
    assert [o for o in objects if o["kind"].endswith(("Role", "RoleBinding"))] == []
    assert of_kind(objects, "ServiceAccount") == []
