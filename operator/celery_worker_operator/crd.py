"""Build the CustomResourceDefinition from the pydantic models in spec.py.

Pydantic writes JSON Schema with `$ref`s, `anyOf [X, null]` for optional fields and titles;
Kubernetes wants a structural schema: everything inlined, one type per node, no nulls.
`structural()` does that translation and nothing else, so every bound, default, description and
CEL rule comes straight from spec.py.
"""

from __future__ import annotations

from typing import Any

from . import spec

DROPPED_KEYS = {"title", "$defs"}

PRINTER_COLUMNS = [
    {"name": "Queues", "type": "string", "jsonPath": ".spec.queues", "description": "Queues consumed"},
    {"name": "Depth", "type": "integer", "jsonPath": ".status.depth", "description": "Messages waiting"},
    {"name": "Wait", "type": "number", "jsonPath": ".status.waitSeconds", "description": "Oldest message age (s)"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas", "description": "Current workers"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas", "description": "Decided workers"},
    {"name": "Mode", "type": "string", "jsonPath": ".status.mode", "description": "Auto, Recommend, Paused or Manual"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node into a Kubernetes structural schema node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = _resolve(schema, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS:
            continue
        if key == "properties":
            out[key] = {name: structural(prop, defs) for name, prop in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            continue  # `false` is pruning, which the API server does anyway; `true` is preserve-unknown-fields
        elif key == "const":  # a one-value Literal; Kubernetes schemas spell it as an enum
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020-12 gives the bound; OpenAPI v3.0 wants it as minimum + a flag.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    return out


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref`s and collapse `anyOf [X, null]` (an optional field) into X."""
    node = dict(schema)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            node = {**defs[node.pop("$ref").rsplit("/", 1)[-1]], **node}
        else:
            branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
            if len(branches) != 1:
                raise ValueError(f"cannot express a union of {len(branches)} types in a structural schema")
            node = {**branches[0], **node}
    if "default" in node and node["default"] is None:
        del node["default"]
    return node


def openapi_schema() -> dict[str, Any]:
    """The whole resource: apiVersion, kind, metadata, spec and status."""
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural(spec.CeleryWorkerPoolSpec.model_json_schema(by_alias=True)),
            "status": structural(spec.CeleryWorkerPoolStatus.model_json_schema(by_alias=True)),
        },
        "x-kubernetes-validations": [rule.as_k8s() for rule in spec.CeleryWorkerPool.RULES],
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest, as a plain dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{spec.PLURAL}.{spec.GROUP}"},
        "spec": {
            "group": spec.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": spec.KIND,
                "listKind": f"{spec.KIND}List",
                "plural": spec.PLURAL,
                "singular": spec.SINGULAR,
                "shortNames": list(spec.SHORT_NAMES),
                "categories": ["celery"],
            },
            "versions": [
                {
                    "name": spec.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }
