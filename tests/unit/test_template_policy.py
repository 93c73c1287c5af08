"""The worker-template policy: every risky field refused by name, allowed only by the operator's list."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from celery_worker_operator.cli import main
from celery_worker_operator.manifests import InvalidPool, parse_pool
from celery_worker_operator.template_policy import ALLOWABLE, TemplatePolicy
from tests.unit.test_spec import BASE

WHERE = "spec.worker.template.spec"
# (template spec, the path refused, the name that allows it)
RISKY: list[tuple[dict[str, Any], str, str]] = [
    ({"serviceAccountName": "deployer"}, f"{WHERE}.serviceAccountName", "serviceAccountName"),
    ({"serviceAccount": "deployer"}, f"{WHERE}.serviceAccount", "serviceAccountName"),
    ({"automountServiceAccountToken": True}, f"{WHERE}.automountServiceAccountToken", "automountServiceAccountToken"),
    ({"hostNetwork": True}, f"{WHERE}.hostNetwork", "hostNetwork"),
    ({"hostPID": True}, f"{WHERE}.hostPID", "hostPID"),
    ({"hostIPC": True}, f"{WHERE}.hostIPC", "hostIPC"),
    (
        {"volumes": [{"name": "cache", "emptyDir": {}}, {"name": "root", "hostPath": {"path": "/"}}]},
        f"{WHERE}.volumes[1].hostPath",
        "hostPath",
    ),
    (
        {"containers": [{"name": "worker", "securityContext": {"privileged": True}}]},
        f"{WHERE}.containers[0].securityContext.privileged",
        "privileged",
    ),
    (
        {"initContainers": [{"name": "a"}, {"name": "b", "securityContext": {"allowPrivilegeEscalation": True}}]},
        f"{WHERE}.initContainers[1].securityContext.allowPrivilegeEscalation",
        "allowPrivilegeEscalation",
    ),
    (
        {"ephemeralContainers": [{"name": "debug", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]},
        f"{WHERE}.ephemeralContainers[0].securityContext.capabilities.add",
        "capabilities",
    ),
]
SAFE = {
    "automountServiceAccountToken": False,
    "hostNetwork": False,
    "hostPID": False,
    "volumes": [{"name": "cache", "emptyDir": {}}],
    "containers": [
        {
            "name": "worker",
            "securityContext": {
                "privileged": False,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"], "add": []},
            },
        }
    ],
}


def pool_with(template_spec: object) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    document["spec"]["worker"]["template"] = {"spec": template_spec}
    return document


@pytest.mark.parametrize(("template_spec", "path", "name"), RISKY, ids=[r[1].removeprefix(WHERE) for r in RISKY])
def test_each_risky_field_is_refused_by_its_path_and_allowed_by_its_name(
    template_spec: dict[str, Any], path: str, name: str
) -> None:
    with pytest.raises(InvalidPool) as refused:
        parse_pool(pool_with(template_spec), TemplatePolicy())
    assert f"{path}: refused by the operator's worker-template policy" in str(refused.value)
    assert f"--allow-template {name}" in str(refused.value)
    assert parse_pool(pool_with(template_spec), TemplatePolicy.allowing(name)).spec.worker is not None
    others = TemplatePolicy.allowing([other for other in ALLOWABLE if other != name])
    with pytest.raises(InvalidPool):
        parse_pool(pool_with(template_spec), others)


def test_every_refused_field_is_named_in_one_pass() -> None:
    everything: dict[str, Any] = {}
    for template_spec, _, _ in RISKY:
        everything.update(template_spec)
    refusals = TemplatePolicy().refusals({"spec": everything})
    assert {str(r).split(":")[0] for r in refusals} == {path for _, path, _ in RISKY}
    assert TemplatePolicy.allowing(list(ALLOWABLE)).refusals({"spec": everything}) == []


def test_safe_values_pass() -> None:
    assert TemplatePolicy().refusals({"spec": SAFE}) == []
    assert parse_pool(pool_with(SAFE), TemplatePolicy()).spec.worker is not None


@pytest.mark.parametrize(
    "template",
    [None, "a string", [], {"spec": "x"}, {"spec": {"volumes": "x", "containers": [None, 3, {"securityContext": 1}]}}],
)
def test_malformed_templates_are_left_to_the_schema(template: object) -> None:
    assert TemplatePolicy().refusals(template) == []


def test_refusals_come_with_schema_errors_in_one_message() -> None:
    document = pool_with({"hostNetwork": True})
    document["spec"]["autoscaling"] = {"maxReplicas": 0}
    with pytest.raises(InvalidPool) as refused:
        parse_pool(document, TemplatePolicy())
    assert "spec.autoscaling.maxReplicas" in str(refused.value)
    assert f"{WHERE}.hostNetwork" in str(refused.value)


def test_without_a_policy_the_template_is_not_looked_at() -> None:
    """Local mode runs processes, not pods: the template means nothing there."""
    assert parse_pool(pool_with({"hostNetwork": True})).spec.worker is not None


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown template field hostpath"):
        TemplatePolicy.allowing("hostNetwork, hostpath")
    assert TemplatePolicy.allowing(" hostNetwork ,, hostPath").allowed == {"hostNetwork", "hostPath"}


def test_validate_applies_the_default_policy_and_the_allow_list(tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(pool_with({"serviceAccountName": "x", "volumes": [{"name": "h", "hostPath": {}}]})))
    runner = CliRunner()
    refused = runner.invoke(main, ["validate", str(pool)])
    assert refused.exit_code == 2
    assert f"{WHERE}.serviceAccountName" in refused.output and f"{WHERE}.volumes[0].hostPath" in refused.output
    allowed = runner.invoke(main, ["validate", "--allow-template", "serviceAccountName,hostPath", str(pool)])
    assert (allowed.exit_code, "is valid" in allowed.output) == (0, True)
    from_env = runner.invoke(main, ["validate", str(pool)], env={"CWO_ALLOW_TEMPLATE": "hostPath,serviceAccountName"})
    assert from_env.exit_code == 0
    unknown = runner.invoke(main, ["validate", "--allow-template", "root", str(pool)])
    assert unknown.exit_code == 2 and "unknown template field root" in unknown.output


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"a": node}
    return node


def test_a_template_deeper_than_any_pod_template_is_invalid_however_deep() -> None:
    assert TemplatePolicy().refusals(nested(40)) == [], "depth is not the policy's: no flag allows it"
    deepest_real = {"spec": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"podAffinityTerm": {"labelSelector": {"matchExpressions": [{"values": ["x"]}]}}}]}}}}  # fmt: skip
    assert parse_pool(pool_with(deepest_real["spec"]), TemplatePolicy()).spec.worker is not None
    for depth in (33, 10_000):
        document = copy.deepcopy(BASE)
        document["spec"]["worker"]["template"] = nested(depth)
        with pytest.raises(InvalidPool, match=r"spec\.worker\.template: nested deeper than 32 levels"):
            parse_pool(document)


def test_validate_reads_yaml_as_deep_as_the_api_server_stores(tmp_path: Path) -> None:
    """kube-apiserver keeps objects up to 10,000 levels deep; the CLI reads them as a problem, not a crash."""
    document = copy.deepcopy(BASE)
    document["spec"]["worker"]["template"] = {"spec": "PLACEHOLDER"}
    text = yaml.safe_dump(document).replace("PLACEHOLDER", '{"a":' * 9_990 + "{}" + "}" * 9_990)
    pool = tmp_path / "deep.yaml"
    pool.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(pool)])
    assert result.exit_code == 2, result.output
    assert "spec.worker.template: nested deeper than 32 levels" in result.output
