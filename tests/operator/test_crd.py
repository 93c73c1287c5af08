"""The committed CRD on a real kube-apiserver: admitted (structural schema, CEL cost budget), every
example applies with `kubectl apply -f`, the server's defaults are the models' defaults, and every
broken spec of tests/unit/test_spec.py is refused by the server with the field named."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from celery_worker_operator import spec
from celery_worker_operator.manifests import parse_pool
from tests.support.cluster import Cluster
from tests.support.operator_process import CRD_FILE, install_crd
from tests.unit.test_spec import BROKEN, EXAMPLES

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def crd(kube_cluster: Cluster) -> Cluster:
    install_crd(kube_cluster)
    return kube_cluster


def test_the_committed_crd_is_established_with_its_printer_columns(crd: Cluster, kube_api: client.ApiClient) -> None:
    name = f"{spec.PLURAL}.{spec.GROUP}"
    response = client.ApiextensionsV1Api(kube_api).read_custom_resource_definition(name, _preload_content=False)
    stored = json.loads(response.data)
    conditions = {c["type"]: c["status"] for c in stored["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NonStructuralSchema") is None, conditions
    committed = yaml.safe_load(CRD_FILE.read_text())
    assert (
        stored["spec"]["versions"][0]["additionalPrinterColumns"]
        == committed["spec"]["versions"][0]["additionalPrinterColumns"]
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_applies_with_kubectl_and_gets_the_models_defaults(
    path: Path, crd: Cluster, kube_api: client.ApiClient
) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    namespaces = {doc["metadata"].get("namespace", "default") for doc in documents}
    for namespace in namespaces - {"default"}:
        crd.kubectl("create", "namespace", namespace)
    try:
        crd.kubectl("apply", "-f", str(path))  # as the README tells users to, namespaces as written
        for document in (doc for doc in documents if doc["kind"] == spec.KIND):
            pool = parse_pool(document)
            response = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
                spec.GROUP,
                spec.VERSION,
                pool.metadata.namespace,
                spec.PLURAL,
                pool.metadata.name,
                _preload_content=False,
            )
            # The API server's defaults and the models' defaults are the same defaults.
            assert json.loads(response.data)["spec"] == pool.spec.model_dump(by_alias=True, exclude_none=True)
    finally:
        crd.kubectl("delete", "--wait=false", "-f", str(path))
        for namespace in namespaces - {"default"}:
            crd.kubectl("delete", "namespace", namespace, "--wait=false")


def refusal(api: client.ApiClient, namespace: str, document: dict[str, Any]) -> str | None:
    """The server's answer to creating `document` (dry run, strict field validation), or None if admitted."""
    body = {**document, "metadata": {**document["metadata"], "namespace": namespace}}
    try:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            spec.GROUP, spec.VERSION, namespace, spec.PLURAL, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as error:
        assert error.status in (400, 422), error
        return str(json.loads(error.body)["message"])
    return None


@pytest.mark.parametrize(("what", "document", "field"), BROKEN, ids=[b[0] for b in BROKEN])
def test_every_broken_spec_is_refused_by_the_server_naming_the_field(
    what: str, document: dict[str, Any], field: str, crd: Cluster, kube_api: client.ApiClient, kube_namespace: str
) -> None:
    message = refusal(kube_api, kube_namespace, document)
    assert message is not None, f"kube-apiserver admits: {what}"
    assert re.search(field, message), message
    assert "s3cret" not in message, "the server's refusal repeats a password"
