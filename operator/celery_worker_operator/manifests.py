"""Reading pool manifests from YAML, with errors a person can act on.

Every problem names where it is: the file, the line of the document and the field, in camelCase
as written. A file is read whole and checked whole, so one pass reports all of its problems.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .spec import KIND, PATTERN_MEANING, CeleryWorkerPool
from .template_policy import TemplatePolicy, depth_problem, worker_template

STDIN = Path("-")
MANIFEST_SUFFIXES = (".yaml", ".yml")


class InvalidPool(ValueError):
    """A manifest that is not a valid CeleryWorkerPool; the message lists every problem by field."""


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _phrase(problem: ErrorDetails) -> str:
    """What is wrong, in words: the pattern's meaning rather than its regex, the type found."""
    kind, ctx = problem["type"], problem.get("ctx") or {}
    if kind == "string_pattern_mismatch":
        return f"must be {PATTERN_MEANING.get(ctx.get('pattern', ''), 'in the documented format')}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a field here (check the spelling and the indentation)"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of fields, not {_type_name(problem['input'])}"
    if kind == "list_type":
        return f"must be a list, not {_type_name(problem['input'])}"
    return problem["msg"].removeprefix("Value error, ")


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, `spec.autoscaling.maxReplicas: message`, in camelCase as written.

    Only the message is shown, never the input value: a rejected broker URL may hold a password.
    """
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        for message in _phrase(problem).splitlines():
            lines.append(f"{where}: {message}" if where else message)
    return lines


def parse_pool(document: dict[str, Any], template_policy: TemplatePolicy | None = None) -> CeleryWorkerPool:
    """Validate one manifest; raise InvalidPool naming the pool and each bad field.

    With `template_policy` (the operator, `validate`), `worker.template` fields it refuses are problems
    too; without it (local mode, which runs no pods) only the template's depth is looked at."""
    too_deep = depth_problem(worker_template(document))
    pool, problems = None, [too_deep] if too_deep else []
    try:
        pool = CeleryWorkerPool.model_validate(document)
    except ValidationError as error:
        problems += describe_errors(error)
    if template_policy is not None:
        problems += [str(refusal) for refusal in template_policy.refusals(worker_template(document))]
    if pool is None or problems:
        metadata = document.get("metadata")
        name = metadata.get("name", "<unnamed>") if isinstance(metadata, dict) else "<unnamed>"
        raise InvalidPool(f"CeleryWorkerPool {name} is invalid:\n  " + "\n  ".join(problems))
    return pool


@dataclass(frozen=True)
class Document:
    """One YAML document and where it starts, so a problem can name its line."""

    origin: str
    line: int
    content: Any

    @property
    def where(self) -> str:
        return f"{self.origin}:{self.line}"


@dataclass
class Checked:
    """What one file holds: the valid pools and every problem found, each naming its place."""

    origin: str
    pools: list[CeleryWorkerPool] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def manifest_files(source: Path) -> list[Path]:
    """`source` itself, the YAML files of a directory (recursively, sorted), or `-` for stdin."""
    if source == STDIN or not source.is_dir():
        return [source]
    return sorted(p for p in source.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())


def read_documents(source: Path) -> list[Document]:
    """The non-empty YAML documents of a file (or stdin); InvalidPool names the line of a syntax error."""
    origin = "<stdin>" if source == STDIN else str(source)
    try:
        text = sys.stdin.read() if source == STDIN else source.read_text()
    except (OSError, ValueError) as error:  # ValueError: undecodable bytes, or a NUL in the path
        raise InvalidPool(f"{origin}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    try:
        return [doc for doc in _documents(origin, text) if doc.content is not None]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InvalidPool(f"{origin}{line}: not valid YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise InvalidPool(f"{origin}: not valid YAML: {error}") from None
    except RecursionError:
        raise InvalidPool(f"{origin}: nested too deeply to read") from None


def _documents(origin: str, text: str) -> Iterator[Document]:
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            assert node is not None  # check_node() said one follows
            yield Document(origin, node.start_mark.line + 1, loader.construct_document(node))
    finally:
        loader.dispose()


def check_document(document: Document, checked: Checked, template_policy: TemplatePolicy | None = None) -> None:
    """Add the document's pool, or its problems, to `checked`; other kinds (Secrets...) are skipped."""
    content = document.content
    if not isinstance(content, dict):
        checked.problems.append(
            f"{document.where}: a manifest must be a mapping (apiVersion, kind, metadata, spec), "
            f"not {_type_name(content)}"
        )
        return
    if content.get("kind") != KIND:
        return
    try:
        checked.pools.append(parse_pool(content, template_policy))
    except InvalidPool as invalid:
        checked.problems.append(f"{document.where}: {invalid}")


def check_file(source: Path, template_policy: TemplatePolicy | None = None) -> Checked:
    """Every pool of a file and every problem in it, in one pass."""
    checked = Checked("<stdin>" if source == STDIN else str(source))
    try:
        documents = read_documents(source)
    except InvalidPool as unreadable:
        checked.problems.append(str(unreadable))
        return checked
    for document in documents:
        check_document(document, checked, template_policy)
    if not checked.pools and not checked.problems:
        checked.problems.append(f"{checked.origin}: holds no {KIND}")
    return checked


def load_pools(path: Path) -> list[CeleryWorkerPool]:
    """Every CeleryWorkerPool in a (multi-document) YAML file; InvalidPool lists every problem."""
    checked = check_file(path)
    if checked.problems:
        raise InvalidPool("\n".join(checked.problems))
    return checked.pools
