"""What the Kubernetes API server does to a CeleryWorkerPool before storing it, offline.

No kube-apiserver can run here, so this applies the CRD the way the server does, in its order:
defaults from the structural schema, OpenAPI v3 validation (with `kubectl`'s default strict field
validation, so unknown fields are errors), then every `x-kubernetes-validations` CEL rule with
`self` bound to its node. Errors read like the server's: `spec.autoscaling.maxReplicas: message`.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema

Schema = dict[str, Any]


def apply_defaults(node: Any, schema: Schema) -> Any:
    """Fill `default`s top-down, as the API server does when it reads an object."""
    if isinstance(node, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in node and "default" in prop:
                node[name] = copy.deepcopy(prop["default"])
            if name in node:
                node[name] = apply_defaults(node[name], prop)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in node:
                node[key] = apply_defaults(node[key], extra)
    elif isinstance(node, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in node]
    return node


def unknown_fields(node: Any, schema: Schema, path: str) -> list[str]:
    """Fields the schema does not declare (the server's strict field validation rejects them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors: list[str] = []
    if isinstance(node, dict) and "properties" in schema:
        for key, value in node.items():
            if key not in schema["properties"]:
                errors.append(f'{path}: unknown field "{key}"' if path else f'unknown field "{key}"')
            else:
                errors += unknown_fields(value, schema["properties"][key], _join(path, key))
    elif isinstance(node, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in node.items():
            errors += unknown_fields(value, schema["additionalProperties"], f"{path}[{key}]")
    elif isinstance(node, list) and "items" in schema:
        for index, item in enumerate(node):
            errors += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return errors


def typed(node: Any, schema: Schema) -> Any:
    """Give values the CEL types the server derives from the schema (a `number` is a double)."""
    if schema.get("type") == "number" and isinstance(node, int) and not isinstance(node, bool):
        return float(node)
    if isinstance(node, dict):
        if "properties" in schema:
            return {k: typed(v, schema["properties"].get(k, {})) for k, v in node.items()}
        extra = schema.get("additionalProperties")
        return {k: typed(v, extra if isinstance(extra, dict) else {}) for k, v in node.items()}
    if isinstance(node, list):
        return [typed(item, schema.get("items", {})) for item in node]
    return node


class ApiServer:
    """Admission of CeleryWorkerPool objects against one CRD's schema."""

    def __init__(self, crd: dict[str, Any]) -> None:
        self.schema: Schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        jsonschema.Draft4Validator.check_schema(_openapi_only(self.schema))
        self.validator = jsonschema.Draft4Validator(_openapi_only(self.schema))
        self.cel = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def admit(self, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The object as it would be stored, and every reason it would be refused."""
        stored = apply_defaults(copy.deepcopy(obj), self.schema)
        errors = unknown_fields(stored, self.schema, "")
        for error in self.validator.iter_errors(stored):
            errors.append(f"{_join_all(error.absolute_path)}: {error.message}")
        if not errors:
            errors += self._cel_errors(typed(stored, self.schema), self.schema, "")
        return stored, errors

    def _cel_errors(self, node: Any, schema: Schema, path: str) -> list[str]:
        errors = []
        for rule in schema.get("x-kubernetes-validations", []):
            if not self._holds(rule["rule"], node):
                errors.append(f"{path}{rule.get('fieldPath', '')}: {rule['message']}".lstrip("."))
        if isinstance(node, dict) and "properties" in schema:
            for key, value in node.items():
                if key in schema["properties"]:
                    errors += self._cel_errors(value, schema["properties"][key], _join(path, key))
        elif isinstance(node, dict) and isinstance(schema.get("additionalProperties"), dict):
            for key, value in node.items():
                errors += self._cel_errors(value, schema["additionalProperties"], f"{path}[{key}]")
        elif isinstance(node, list) and "items" in schema:
            for index, item in enumerate(node):
                errors += self._cel_errors(item, schema["items"], f"{path}[{index}]")
        return errors

    def _holds(self, rule: str, value: Any) -> bool:
        if rule not in self._programs:
            self._programs[rule] = self.cel.program(self.cel.compile(rule))
        return bool(self._programs[rule].evaluate({"self": celpy.json_to_cel(value)}))


def _openapi_only(schema: Any) -> Any:
    """Drop the `x-kubernetes-*` extensions, which JSON Schema validators do not know."""
    if isinstance(schema, dict):
        return {k: _openapi_only(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if isinstance(schema, list):
        return [_openapi_only(v) for v in schema]
    return schema


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _join_all(parts: Any) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    return path
