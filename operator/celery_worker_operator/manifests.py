"""Reading pool manifests from YAML, with errors a person can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .spec import KIND, CeleryWorkerPool


class InvalidPool(ValueError):
    """A manifest that is not a valid CeleryWorkerPool; the message lists every problem by field."""


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, `spec.autoscaling.maxReplicas: message`, in camelCase as written.

    Only the message is shown, never the input value: a rejected broker URL may hold a password.
    """
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        for message in problem["msg"].removeprefix("Value error, ").splitlines():
            if message.startswith("."):  # a cross-field Rule naming a field below `where`
                lines.append(f"{where}{message}" if where else message[1:])
            else:
                lines.append(f"{where}: {message}" if where else message)
    return lines


def parse_pool(document: dict[str, Any]) -> CeleryWorkerPool:
    """Validate one manifest; raise InvalidPool naming the pool and each bad field."""
    try:
        return CeleryWorkerPool.model_validate(document)
    except ValidationError as error:
        name = (document.get("metadata") or {}).get("name", "<unnamed>")
        raise InvalidPool(f"CeleryWorkerPool {name} is invalid:\n  " + "\n  ".join(describe_errors(error))) from None


def load_pools(path: Path) -> list[CeleryWorkerPool]:
    """Every CeleryWorkerPool in a (multi-document) YAML file; other kinds, e.g. Secrets, are skipped."""
    with path.open() as stream:
        documents = [doc for doc in yaml.safe_load_all(stream) if doc]
    pools = [parse_pool(doc) for doc in documents if doc.get("kind") == KIND]
    if not pools:
        raise InvalidPool(f"{path} holds no {KIND}")
    return pools
