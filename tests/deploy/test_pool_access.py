"""Who may create pools, in the chart: the worker-template policy reaches `run`, and the pools join the
cluster's view/edit/admin roles (tests/operator/test_pool_access.py runs both on a real API server)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from celery_worker_operator.cli import run
from celery_worker_operator.spec import GROUP, PLURAL
from celery_worker_operator.template_policy import TemplatePolicy

from .chart import manifests, of_kind, render

AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def run_args(values: dict[str, Any]) -> list[str]:
    (deployment,) = of_kind(manifests(values), "Deployment")
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


def pool_roles(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The aggregated ClusterRoles by the roles they join (`view`, `edit`...), keyed by the least of them."""
    roles = {}
    for role in of_kind(manifests(values), "ClusterRole"):
        joins = sorted(k.removeprefix(AGGREGATE) for k in role["metadata"]["labels"] if k.startswith(AGGREGATE))
        if joins:
            roles["view" if "view" in joins else "edit"] = role | {"joins": joins}
    return roles


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }


def test_by_default_no_template_field_is_allowed() -> None:
    params = run.make_context("run", run_args({})).params
    assert params["template_policy"] == TemplatePolicy()


def test_the_allow_list_reaches_the_operator() -> None:
    args = run_args({"workerTemplatePolicy": {"allow": ["hostPath", "serviceAccountName"]}})
    assert "--allow-template=hostPath,serviceAccountName" in args
    assert run.make_context("run", args).params["template_policy"].allowed == {"hostPath", "serviceAccountName"}


@pytest.mark.parametrize("allow", [["hostpath"], ["privileged", "privileged"], "privileged"])
def test_the_schema_refuses_what_the_operator_would(allow: object) -> None:
    with pytest.raises(helm.HelmError, match="schema"):
        render({"workerTemplatePolicy": {"allow": allow}})


def test_pools_join_view_edit_and_admin() -> None:
    roles = pool_roles({})
    assert roles["view"]["joins"] == ["admin", "edit", "view"]
    assert roles["edit"]["joins"] == ["admin", "edit"]
    assert grants(roles["view"]) == {
        (GROUP, res, v) for res in (PLURAL, f"{PLURAL}/status", f"{PLURAL}/scale") for v in ("get", "list", "watch")
    }
    edit = grants(roles["edit"])
    assert {(GROUP, PLURAL, v) for v in ("get", "list", "watch", "create", "update", "patch", "delete")} <= edit
    assert all(group == GROUP for group, _, _ in edit), "pool editors get pools, nothing else"
    status_writes = {v for _, resource, v in edit if resource.endswith("/status")} - {"get", "list", "watch"}
    assert status_writes == set(), "status is the operator's"


@pytest.mark.parametrize(
    "values", [{"poolRoles": {"aggregate": False}}, {"rbac": {"create": False}, "serviceAccount": {"create": False}}]
)
def test_aggregation_can_be_left_out(values: dict[str, Any]) -> None:
    assert pool_roles(values) == {}
