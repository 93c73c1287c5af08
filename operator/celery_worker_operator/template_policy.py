"""What a pool's `worker.template` may ask of the node and the API, as the operator's configuration allows.

The operator creates worker Deployments with its own rights, so whoever may create a CeleryWorkerPool
but not a Deployment could otherwise have it run pods under any ServiceAccount of the namespace, in the
node's network or process namespaces, with the node's files or as root on the node (a confused deputy).
Each such field is refused, naming where it is set, unless the operator was started allowing it; a
field set to its safe value (`false`, no added capabilities) is fine. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# What each allowable name lets a pool's template do.
ALLOWABLE: dict[str, str] = {
    "serviceAccountName": "run the workers under another ServiceAccount (serviceAccountName or serviceAccount)",
    "automountServiceAccountToken": "mount a ServiceAccount token the ServiceAccount itself withholds",
    "hostNetwork": "use the node's network namespace",
    "hostPID": "see the node's processes",
    "hostIPC": "share the node's IPC namespace",
    "hostPath": "mount a directory of the node",
    "privileged": "run a privileged container",
    "allowPrivilegeEscalation": "let a process gain more privileges than its parent",
    "capabilities": "add Linux capabilities",
}
CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")
TEMPLATE_PATH = "spec.worker.template"
# A PodTemplateSpec's deepest fields (affinity terms, ephemeral volume claims) sit about 12 levels down;
# the API server stores a template up to 10,000 levels deep, which only serves to exhaust a reader.
MAX_TEMPLATE_DEPTH = 32


@dataclass(frozen=True)
class Refusal:
    """One field the policy refuses: where it is set (`spec.worker.template.spec.hostNetwork`) and what
    would allow it."""

    path: str
    allowable: str

    def __str__(self) -> str:
        return (
            f"{self.path}: refused by the operator's worker-template policy: it would let the workers "
            f"{ALLOWABLE[self.allowable]} (allowed only when the operator runs with --allow-template {self.allowable})"
        )


@dataclass(frozen=True)
class TemplatePolicy:
    """The fields a pool's template may set; the default allows none of them."""

    allowed: frozenset[str] = frozenset()

    @classmethod
    def allowing(cls, names: str | list[str] | tuple[str, ...]) -> TemplatePolicy:
        """From names (a comma list or a sequence); ValueError names any that is not allowable."""
        given = names.split(",") if isinstance(names, str) else list(names)
        chosen = frozenset(name.strip() for name in given if name.strip())
        unknown = sorted(chosen - ALLOWABLE.keys())
        if unknown:
            raise ValueError(f"unknown template field {', '.join(unknown)}: choose from {', '.join(ALLOWABLE)}")
        return cls(chosen)

    def refusals(self, template: object) -> list[Refusal]:
        """Every field of `template` (a PodTemplateSpec as written) this policy refuses."""
        return [found for found in _risky_fields(template) if found.allowable not in self.allowed]


def worker_template(document: object) -> object:
    """`spec.worker.template` of a manifest as written, before (or without) validation."""
    return _mapping(_mapping(_mapping(document).get("spec")).get("worker")).get("template")


def depth_problem(template: object) -> str | None:
    """A template nested deeper than any PodTemplateSpec is, named as a problem; measured without recursion."""
    pending, deepest = [(template, 0)], 0
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_TEMPLATE_DEPTH:
            return f"{TEMPLATE_PATH}: nested deeper than {MAX_TEMPLATE_DEPTH} levels, which no PodTemplateSpec is"
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return None


def _set(value: object) -> bool:
    """A field that asks for something: present and neither false nor empty."""
    return value not in (None, False, "", [], {})


def _risky_fields(template: object) -> Iterator[Refusal]:
    spec = _mapping(_mapping(template).get("spec"))
    where = f"{TEMPLATE_PATH}.spec"
    for key, allowable in (
        ("serviceAccountName", "serviceAccountName"),
        ("serviceAccount", "serviceAccountName"),
        ("automountServiceAccountToken", "automountServiceAccountToken"),
        ("hostNetwork", "hostNetwork"),
        ("hostPID", "hostPID"),
        ("hostIPC", "hostIPC"),
    ):
        if _set(spec.get(key)):
            yield Refusal(f"{where}.{key}", allowable)
    for index, volume in _items(spec.get("volumes")):
        if volume.get("hostPath") is not None:  # any hostPath, even one the API server will find incomplete
            yield Refusal(f"{where}.volumes[{index}].hostPath", "hostPath")
    for kind in CONTAINER_LISTS:
        for index, container in _items(spec.get(kind)):
            yield from _container_fields(f"{where}.{kind}[{index}].securityContext", container)


def _container_fields(where: str, container: Mapping[str, Any]) -> Iterator[Refusal]:
    context = _mapping(container.get("securityContext"))
    for key in ("privileged", "allowPrivilegeEscalation"):
        if _set(context.get(key)):
            yield Refusal(f"{where}.{key}", key)
    if _set(_mapping(context.get("capabilities")).get("add")):
        yield Refusal(f"{where}.capabilities.add", "capabilities")


def _mapping(value: object) -> Mapping[str, Any]:
    """A mapping as is; anything else as empty (the API server refuses a malformed template itself)."""
    return value if isinstance(value, Mapping) else {}


def _items(value: object) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, Mapping):
                yield index, item
