"""The CeleryWorkerPool API: pydantic models of spec and status, the single source of truth.

The CRD in deploy/crds/ is generated from these models (see crd.py), so a field, default or bound
is declared once. Cross-field rules are declared once too, as `Rule`s that carry both their CEL
text (checked by the API server) and a Python predicate (checked here, for local mode and for
pools that reach the operator some other way); tests hold the two to the same verdicts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from .naming import PoolIdentity
from .urls import SSL_PARAMETER

GROUP = "celery-operator.dev"
VERSION = "v1alpha1"
KIND = "CeleryWorkerPool"
PLURAL = "celeryworkerpools"
SINGULAR = "celeryworkerpool"
SHORT_NAMES = ("cwp",)
API_VERSION = f"{GROUP}/{VERSION}"
PAUSED_ANNOTATION = f"{GROUP}/paused"  # "true": no scaling and no broadcasts until removed
PAUSED_REPLICAS_ANNOTATION = f"{GROUP}/paused-replicas"  # with it: replicas set to this and held

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
TASK_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
QUEUE_NAME = r"^[A-Za-z0-9_.:-]+$"
# A positive rate: Celery reads 0/m as "no limit", the opposite of what it seems to ask for.
RATE = r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)/[smh]$"
BROKER_SCHEME = r"^(redis|rediss|sentinel|amqp|amqps|pyamqp)://"
# Userinfo with a password, in the URL or in any later `;`-separated one (Celery's sentinel://a;sentinel://b),
# or a password query parameter (redis-py accepts `?password=`).
INLINE_PASSWORD = r"(^|;)[^:/;]+://[^/@;]*:[^/@]*@|[?&]password="
# Worker flags the operator sets itself (and -X, which would undo -Q); a second copy in extraArgs would
# silently win or clash. Click reads a short option's value glued on (`-nother@host`) and short flags
# bundled (`-Bc8` is -B -c 8; -B, -D and -E are the worker's flags), so those forms are owned too. `(?s)`:
# a newline is part of the argument for RE2 (CEL) and Python alike.
OWNED_FLAGS = (
    r"(?s)^(--(app|concurrency|pool|queues|exclude-queues|hostname|events|task-events)(=.*)?|-[BD]*[AcPQXnE].*)$"
)

# What each pattern asks for, in words: error messages say this instead of the regex.
PATTERN_MEANING = {
    DNS1123_LABEL: "a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit",
    DNS1123_SUBDOMAIN: "a DNS-1123 name: lower-case letters, digits, '-' and '.', such as my-secret",
    SECRET_KEY: "a Secret key: letters, digits, '-', '_' and '.'",
    TASK_NAME: "a task name such as app.tasks.send_email",
    QUEUE_NAME: "a queue name: letters, digits, '_', '.', ':' and '-', no spaces",
    RATE: "a rate above zero such as 10/s, 200/m or 1.5/h (Celery reads 0 as no limit)",
    BROKER_SCHEME: "a URL starting with redis://, rediss://, sentinel://, amqp://, amqps:// or pyamqp://",
}

DnsLabel = Annotated[str, StringConstraints(pattern=DNS1123_LABEL, max_length=63)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS1123_SUBDOMAIN, max_length=253)]
QueueName = Annotated[str, StringConstraints(pattern=QUEUE_NAME, max_length=200)]
RateLimit = Annotated[str, StringConstraints(pattern=RATE, max_length=32)]


STEP_PODS = "Change at most this many pods per poll, or maxStepPercent, whichever allows more."
STEP_PERCENT = "Change at most this percent of current replicas per poll, or maxStepPods, whichever allows more."


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, stated once in CEL for the API server and once in Python for us."""

    cel: str
    message: str
    field_path: str
    holds: Callable[[Any], bool]

    def as_k8s(self) -> dict[str, str]:
        entry = {"rule": self.cel, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry

    def explain(self) -> str:
        """`.field: message`, relative to the model, so callers can prefix where the model sits."""
        return f"{self.field_path}: {self.message}" if self.field_path else self.message

    def error(self, node: object) -> InitErrorDetails:
        """This rule's failure as a pydantic error located at its field, relative to the model."""
        loc = tuple(self.field_path.lstrip(".").split(".")) if self.field_path else ()
        return InitErrorDetails(type=PydanticCustomError("rule", self.message), loc=loc, input=node)


def _add_rules(schema: dict[str, Any], cls: type) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "RULES", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_k8s() for rule in rules]


class _Unchecked:
    """The fields of a node that validated on their own: a rule reading any other field is skipped."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


@functools.cache
def _field_adapter(cls: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = cls.model_fields[name]
    annotation: Any = info.annotation
    return TypeAdapter(Annotated[annotation, *info.metadata] if info.metadata else annotation)


def _valid_fields(cls: type[BaseModel], data: object) -> _Unchecked:
    """Every field of `data` that is valid by itself (defaults for those left out), for rules to read."""
    fields: dict[str, Any] = {}
    if not isinstance(data, dict):
        return _Unchecked(fields)
    for name, info in cls.model_fields.items():
        key = info.alias if info.alias in data else name
        if key not in data:
            if not info.is_required():
                fields[name] = info.get_default(call_default_factory=True)
            continue
        try:
            fields[name] = _field_adapter(cls, name).validate_python(data[key])
        except ValidationError:
            continue
    return _Unchecked(fields)


def _rule_errors(rules: tuple[Rule, ...], node: object) -> list[InitErrorDetails]:
    """The rules `node` breaks; a rule that reads a field which is itself invalid is left out."""
    broken = []
    for rule in rules:
        try:
            holds = rule.holds(node)
        except (AttributeError, TypeError):
            continue
        if not holds:
            broken.append(rule.error(node))
    return broken


def _as_details(error: ValidationError) -> list[InitErrorDetails]:
    """Errors already found, to raise again together with more: their type, place and message kept."""
    return [
        InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"], e.get("ctx")), loc=e["loc"], input=e["input"])
        for e in error.errors()
    ]


class Model(BaseModel):
    """camelCase on the wire, unknown fields rejected, immutable once parsed."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        json_schema_extra=_add_rules,
    )
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="wrap")
    @classmethod
    def _check_rules(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Field errors and broken rules together, so one pass reports every problem of a manifest.

        When some fields are invalid, the rules are still checked on the fields that are valid, as
        the API server checks its CEL rules next to its schema errors.
        """
        try:
            model = handler(data)
        except ValidationError as invalid:
            broken = _rule_errors(cls.RULES, _valid_fields(cls, data))
            if not broken:
                raise
            raise ValidationError.from_exception_data(cls.__name__, _as_details(invalid) + broken) from None
        broken = _rule_errors(cls.RULES, model)
        if broken:
            raise ValidationError.from_exception_data(cls.__name__, broken)
        return model


def section(model: type[Model], description: str) -> Any:
    """A nested object that is always present, defaulted whole: kube-apiserver checks a default
    against the section's own CEL rules as it stands, so `{}` would fail a rule that reads its fields."""
    defaults = model().model_dump(mode="json", by_alias=True, exclude_none=True)
    return Field(default_factory=model, description=description, json_schema_extra={"default": defaults})


class SecretKeyRef(Model):
    name: DnsSubdomain = Field(description="Name of a Secret in the pool's namespace.")
    key: Annotated[str, StringConstraints(pattern=SECRET_KEY, max_length=253)] = Field(
        description="Key inside the Secret holding the value."
    )


class ValueFrom(Model):
    secret_key_ref: SecretKeyRef = Field(description="The Secret key holding the value.")


class TransportOptions(Model):
    """Celery's `broker_transport_options` that decide where messages sit, with Celery's own keys.

    The probe reads the broker the way the app writes to it, and managed workers start with the
    same options, so an app that changes the Redis layout is neither under-counted nor split.
    """

    model_config = ConfigDict(alias_generator=None)

    priority_steps: tuple[Annotated[int, Field(ge=0, le=255)], ...] | None = Field(  # a tuple: options key caches
        None,
        min_length=1,
        description="Redis priority buckets, ascending (kombu's default [0, 3, 6, 9]; list(range(10)) for 0-9).",
        json_schema_extra={"maxItems": 256, "x-kubernetes-list-type": "set"},
    )
    sep: Annotated[str, StringConstraints(min_length=1, max_length=16)] | None = Field(
        None, description="Separator between a queue name and its priority (kombu's default is \\x06\\x16)."
    )
    global_keyprefix: Annotated[str, StringConstraints(max_length=253)] | None = Field(
        None, description="Prefix of every Redis key kombu writes (kombu's global_keyprefix)."
    )
    queue_order_strategy: Literal["round_robin", "priority", "sorted"] | None = Field(
        None, description="How a worker picks among its queues (workers only; the probe counts all)."
    )
    visibility_timeout: float | None = Field(
        None, gt=0, le=31536000, description="Seconds before an unacknowledged Redis message is redelivered."
    )
    master_name: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = Field(
        None, description="The Redis Sentinel master group of a sentinel:// URL."
    )

    def as_celery(self) -> dict[str, Any]:
        """The options set, as Celery's `broker_transport_options` holds them."""
        return self.model_dump(exclude_none=True)


class BrokerTLS(Model):
    """Files for a rediss:// broker with a private CA or client certificates, each from a Secret key.

    The operator verifies the server and presents the client certificate with them; the workers get
    the same Secrets mounted read-only and Celery's `broker_use_ssl` pointing at them.
    """

    ca_from: ValueFrom | None = Field(
        None, description="PEM CA certificate(s) the broker's certificate must chain to (else the system's CAs)."
    )
    cert_from: ValueFrom | None = Field(None, description="PEM client certificate, presented to the broker.")
    key_from: ValueFrom | None = Field(None, description="PEM private key of the client certificate.")

    RULES = (
        Rule(
            "has(self.certFrom) == has(self.keyFrom)",
            "set certFrom and keyFrom together: the client certificate and its key",
            ".keyFrom",
            lambda t: (t.cert_from is None) == (t.key_from is None),
        ),
        Rule(
            "has(self.caFrom) || has(self.certFrom)",
            "set caFrom, certFrom with keyFrom, or both",
            ".caFrom",
            lambda t: t.ca_from is not None or t.cert_from is not None,
        ),
    )


class BrokerSpec(Model):
    url: Annotated[str, StringConstraints(pattern=BROKER_SCHEME, max_length=2048)] | None = Field(
        None,
        description="Broker URL without a password (redis://, rediss://, amqp://, amqps://, or Celery's "
        "sentinel://host:26379;sentinel://host2:26379 with transportOptions.master_name).",
    )
    url_from: ValueFrom | None = Field(None, description="Broker URL read from a Secret; use this for credentials.")
    username_from: ValueFrom | None = Field(
        None, description="User name from a Secret key, put into url (replacing the URL's own user name)."
    )
    password_from: ValueFrom | None = Field(
        None, description="Password from a Secret key, put into url; workers read it from the Secret, not the manifest."
    )
    management_url_from: ValueFrom | None = Field(
        None, description="RabbitMQ management API URL (http[s]://user:pass@host:15672) read from a Secret."
    )
    transport_options: TransportOptions | None = Field(
        None, description="Celery's broker_transport_options (same keys); the probe and the workers use them."
    )
    tls: BrokerTLS | None = Field(
        None, description="CA, client certificate and key from Secrets for a rediss:// broker (Redis over TLS)."
    )

    RULES = (
        Rule(
            "has(self.url) != has(self.urlFrom)",
            "set exactly one of url or urlFrom",
            ".url",
            lambda b: (b.url is None) != (b.url_from is None),
        ),
        Rule(
            f"!has(self.url) || !self.url.matches(r'{INLINE_PASSWORD}')",
            "url must not carry a password: put the URL in a Secret and use urlFrom.secretKeyRef",
            ".url",
            lambda b: b.url is None or re.search(INLINE_PASSWORD, b.url) is None,
        ),
        Rule(
            "(!has(self.usernameFrom) && !has(self.passwordFrom)) || has(self.url)",
            "usernameFrom and passwordFrom complete url: set url (without credentials), not urlFrom",
            ".url",
            lambda b: (b.username_from is None and b.password_from is None) or b.url is not None,
        ),
        Rule(
            "!has(self.url) || !self.url.startsWith('sentinel://') || "
            "(has(self.transportOptions) && has(self.transportOptions.master_name))",
            "a sentinel:// url needs transportOptions.master_name, the master group to ask the sentinels for",
            ".transportOptions",
            lambda b: (
                b.url is None
                or not b.url.startswith("sentinel://")
                or (b.transport_options is not None and b.transport_options.master_name is not None)
            ),
        ),
        Rule(
            "!has(self.tls) || !has(self.url) || self.url.startsWith('rediss://')",
            "tls applies to a rediss:// url (Redis over TLS); a URL from urlFrom is checked when it is read",
            ".tls",
            lambda b: b.tls is None or b.url is None or b.url.startswith("rediss://"),
        ),
        Rule(
            f"!has(self.tls) || !has(self.url) || !self.url.matches(r'{SSL_PARAMETER}')",
            "with tls, url must not set ssl_* parameters: tls sets them",
            ".url",
            lambda b: b.tls is None or b.url is None or re.search(SSL_PARAMETER, b.url) is None,
        ),
    )


class ScalingStep(Model):
    stabilization_seconds: float = Field(
        0, ge=0, le=3600, description="Window over which recommendations are smoothed (HPA semantics)."
    )
    max_step_pods: int = Field(10, ge=1, le=1000, description=STEP_PODS)
    max_step_percent: int = Field(100, ge=1, le=1000, description=STEP_PERCENT)


class ScaleUp(ScalingStep):
    """Scale-up: react at once by default, since a waiting task is the cost we are here to cut."""


class ScaleDown(ScalingStep):
    """Scale-down: a short window is enough because only idle workers are removed and a Celery
    worker starts in seconds; 10 s (down from 30) cut the simulated cost by a fifth at the same
    waits (benchmarks/policy.py), and 5 s cut real workers' cost after a burst (at pollSeconds 5,
    benchmarks/real_workload.py burst-trickle: 0.64x KEDA-tuned's at 10 s) at the same p95."""

    stabilization_seconds: float = Field(
        5, ge=0, le=3600, description="The highest recommendation in this window wins (HPA semantics)."
    )
    max_step_pods: int = Field(5, ge=1, le=1000, description=STEP_PODS)
    max_step_percent: int = Field(50, ge=1, le=1000, description=STEP_PERCENT)
    mode: Literal["deletionCost", "drain"] = Field(
        "deletionCost",
        description="deletionCost: mark the least busy pods for removal; drain: cancel their consumers "
        "and wait until they are idle first.",
    )


class AutoscalingSpec(Model):
    enabled: bool = Field(
        True, description="When false, replicas follow spec.replicas (`kubectl scale cwp`), or stay as they are."
    )
    mode: Literal["auto", "recommend"] = Field(
        "auto",
        description="auto: scale and broadcast limits; recommend: measure and decide (status.desiredReplicas, "
        "'would scale' Events, metrics) but never scale and never broadcast, to run beside another autoscaler.",
    )
    min_replicas: int = Field(1, ge=0, le=10000, description="Fewest workers; 0 allows scale to zero.")
    max_replicas: int = Field(10, ge=1, le=10000, description="Most workers.")
    target_wait_seconds: float = Field(
        30, gt=0, le=86400, description="How long a task may wait in the queue before a worker picks it."
    )
    target_utilization: float = Field(
        0.8, gt=0, le=1, description="Share of worker slots kept busy in steady state (Little's law headroom)."
    )
    poll_seconds: float = Field(10, ge=1, le=3600, description="How often the pool is measured and sized.")
    scale_up: ScaleUp = section(ScaleUp, "Limits on growing.")
    scale_down: ScaleDown = section(ScaleDown, "Limits on shrinking.")
    fallback_replicas: int | None = Field(
        None, ge=0, le=10000, description="Replicas to hold while the broker cannot be measured."
    )
    task_duration_seconds: float | None = Field(
        None, gt=0, le=604800, description="Expected task duration, used until one is measured."
    )
    worker_startup_seconds: float | None = Field(
        None,
        ge=0,
        le=3600,
        description="How long a new worker takes from its start to its first task (process or pod start, "
        "imports, broker connection). When the pool must grow, the backlog is sized to drain in what is left "
        "of the wait target after it. Unset: measured from the pool's own new workers (status."
        "workerStartupSeconds), once one has started; 0 until then.",
    )
    max_concurrent_tasks: int | None = Field(
        None,
        ge=1,
        le=1000000,
        description="Most tasks the whole pool may run at once (replicas x concurrency), to protect a shared "
        "downstream such as a database; binds below maxReplicas.",
    )

    RULES = (
        Rule(
            "self.minReplicas <= self.maxReplicas",
            "maxReplicas must be >= minReplicas",
            ".maxReplicas",
            lambda a: a.min_replicas <= a.max_replicas,
        ),
        Rule(
            "!has(self.fallbackReplicas) || "
            "(self.fallbackReplicas >= self.minReplicas && self.fallbackReplicas <= self.maxReplicas)",
            "fallbackReplicas must lie between minReplicas and maxReplicas",
            ".fallbackReplicas",
            lambda a: a.fallback_replicas is None or a.min_replicas <= a.fallback_replicas <= a.max_replicas,
        ),
    )


class TimeLimit(Model):
    soft: float | None = Field(None, gt=0, le=604800, description="Soft limit in seconds (SoftTimeLimitExceeded).")
    hard: float | None = Field(None, gt=0, le=604800, description="Hard limit in seconds (the child is killed).")

    RULES = (
        Rule(
            "has(self.soft) || has(self.hard)",
            "set soft, hard or both",
            ".soft",
            lambda t: t.soft is not None or t.hard is not None,
        ),
        Rule(
            "!has(self.soft) || !has(self.hard) || self.soft < self.hard",
            "soft must be less than hard",
            ".soft",
            lambda t: t.soft is None or t.hard is None or t.soft < t.hard,
        ),
    )


def _task_names_valid(names: Any) -> bool:
    return all(re.fullmatch(TASK_NAME, name) for name in names)  # `$` alone lets a final newline through


class LimitsSpec(Model):
    rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description='Task name -> rate such as "200/m" (per worker, as Celery applies it).',
        json_schema_extra={"maxProperties": 200, "default": {}},
    )
    time_limits: dict[str, TimeLimit] = Field(
        default_factory=dict,
        description="Task name -> soft/hard time limits in seconds.",
        json_schema_extra={"maxProperties": 200, "default": {}},
    )
    pool_rate_limits: dict[str, RateLimit] = Field(
        default_factory=dict,
        description='Task name -> rate such as "60/m" for the whole pool: each live worker gets its share, '
        "re-sent whenever workers come or go.",
        json_schema_extra={"maxProperties": 200, "default": {}},
    )

    RULES = (
        Rule(
            f"self.rateLimits.all(k, k.matches(r'{TASK_NAME}'))",
            "rateLimits keys must be task names such as app.tasks.send_email",
            ".rateLimits",
            lambda lim: _task_names_valid(lim.rate_limits),
        ),
        Rule(
            f"self.timeLimits.all(k, k.matches(r'{TASK_NAME}'))",
            "timeLimits keys must be task names such as app.tasks.send_email",
            ".timeLimits",
            lambda lim: _task_names_valid(lim.time_limits),
        ),
        Rule(
            f"self.poolRateLimits.all(k, k.matches(r'{TASK_NAME}'))",
            "poolRateLimits keys must be task names such as app.tasks.send_email",
            ".poolRateLimits",
            lambda lim: _task_names_valid(lim.pool_rate_limits),
        ),
        Rule(
            "self.poolRateLimits.all(k, !(k in self.rateLimits))",
            "a task has either a per-worker rateLimits entry or a poolRateLimits entry, not both",
            ".poolRateLimits",
            lambda lim: not set(lim.pool_rate_limits) & set(lim.rate_limits),
        ),
    )


class WorkerSpec(Model):
    app: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:]*$", max_length=253)] = Field(
        description="The Celery app, as given to `celery -A` (e.g. proj.celery:app)."
    )
    image: Annotated[str, StringConstraints(pattern=r"^\S+$", max_length=512)] = Field(
        description="Container image with the app and Celery installed."
    )
    concurrency: int = Field(4, ge=1, le=1000, description="Task slots per worker (-c).")
    pool: Literal["prefork", "threads", "gevent", "eventlet", "solo"] = Field(
        "prefork", description="Execution pool (-P)."
    )
    prefetch_multiplier: int = Field(
        1, ge=1, le=1000, description="Messages reserved per slot; 1 gives the fairest spread for long tasks."
    )
    disable_prefetch: bool = Field(False, description="Reserve nothing ahead (Redis only).")
    acks_late: bool = Field(True, description="Acknowledge after the task runs, so a stopped worker loses nothing.")
    max_tasks_per_child: int | None = Field(None, ge=1, description="Recycle a child after this many tasks.")
    max_memory_per_child: int | None = Field(None, ge=1, description="Recycle a child above this RSS, in KiB.")
    events: bool = Field(True, description="Send task events (-E); the operator measures service times from them.")
    extra_args: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list,
        description="More `celery worker` arguments, including `key=value` settings.",
        json_schema_extra={"maxItems": 64, "default": []},
    )
    soft_shutdown_seconds: float = Field(
        0, ge=0, le=86400, description="worker_soft_shutdown_timeout: time for running tasks to finish on stop."
    )
    template: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod template overrides (a PodTemplateSpec merged over the generated one).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "default": {}},
    )

    RULES = (
        Rule(
            "self.pool != 'solo' || self.concurrency == 1",
            "the solo pool runs one task at a time: concurrency must be 1",
            ".concurrency",
            lambda w: w.pool != "solo" or w.concurrency == 1,
        ),
        Rule(
            f"self.extraArgs.all(a, !a.matches(r'{OWNED_FLAGS}'))",
            "extraArgs must not set -A, -c, -P, -Q, -X, -n or -E (nor glued to a value, -n<name>, or bundled, "
            "-Bc<n>): use the matching fields",
            ".extraArgs",
            lambda w: not any(re.fullmatch(OWNED_FLAGS, arg) for arg in w.extra_args),
        ),
    )


class ScaleTargetRef(Model):
    kind: Literal["Deployment"] = Field("Deployment", description="Kind of the adopted workload.")
    name: DnsSubdomain = Field(description="An existing Deployment in the pool's namespace.")


class CeleryWorkerPoolSpec(Model):
    broker: BrokerSpec = Field(description="Where the pool's queues live.")
    queues: list[QueueName] = Field(
        min_length=1,
        description="Queues the workers consume and the operator measures.",
        json_schema_extra={"maxItems": 32, "x-kubernetes-list-type": "set"},
    )
    worker: WorkerSpec | None = Field(None, description="A Deployment the operator creates and owns.")
    scale_target_ref: ScaleTargetRef | None = Field(None, description="An existing Deployment the operator scales.")
    replicas: int | None = Field(
        None, ge=0, le=10000, description="Replicas while autoscaling is disabled (`kubectl scale cwp` sets it)."
    )
    autoscaling: AutoscalingSpec = section(AutoscalingSpec, "How the pool is sized.")
    limits: LimitsSpec = section(LimitsSpec, "Limits broadcast to every worker of the pool.")

    RULES = (
        Rule(
            "has(self.worker) != has(self.scaleTargetRef)",
            "set exactly one of worker (a managed Deployment) or scaleTargetRef (an existing one)",
            ".worker",
            lambda s: (s.worker is None) != (s.scale_target_ref is None),
        ),
        Rule(
            "!has(self.worker) || !self.worker.disablePrefetch || !has(self.broker.url) || "
            "!self.broker.url.startsWith('amqp')",
            "disablePrefetch works on Redis only, and broker.url is AMQP",
            ".worker.disablePrefetch",
            lambda s: (
                s.worker is None
                or not s.worker.disable_prefetch
                or s.broker.url is None
                or not s.broker.url.startswith("amqp")
            ),
        ),
        Rule(
            "!has(self.worker) || !has(self.autoscaling.maxConcurrentTasks) || "
            "self.autoscaling.maxConcurrentTasks >= self.worker.concurrency",
            "autoscaling.maxConcurrentTasks must allow at least one worker (>= worker.concurrency)",
            ".autoscaling.maxConcurrentTasks",
            lambda s: (
                s.worker is None
                or s.autoscaling.max_concurrent_tasks is None
                or s.autoscaling.max_concurrent_tasks >= s.worker.concurrency
            ),
        ),
        Rule(
            "self.queues.all(q, self.queues.exists_one(r, r == q))",
            "queues must not repeat a name",
            ".queues",
            lambda s: len(set(s.queues)) == len(s.queues),
        ),
    )


class QueueStatus(Model):
    name: str
    depth: int = Field(0, ge=0, description="Messages waiting, across priority sub-queues.")
    reserved: int = Field(0, ge=0, description="Messages delivered to a worker and not yet acknowledged.")
    consumers: int | None = Field(None, ge=0)
    oldest_age_seconds: float | None = Field(None, ge=0)


class LastDecision(Model):
    time: datetime
    from_: int = Field(alias="from", ge=0)
    to: int = Field(ge=0)
    reason: str
    kind: str | None = Field(None, description="What drove it: FromZero, ToZero, Backlog, Steady, Blind, Fallback.")
    limit: str | None = Field(
        None, description="What bound it, as the HPA names it: DesiredWithinRange, ScaleUpLimit, TooManyReplicas..."
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """A status condition in the KEP-1623 (metav1.Condition) shape."""

    type: Annotated[str, StringConstraints(pattern=r"^([a-z0-9.-]+/)?[A-Za-z][A-Za-z0-9_]*$", max_length=316)]
    status: ConditionStatus
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)]
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    last_transition_time: datetime
    observed_generation: int | None = Field(None, ge=0)


class CeleryWorkerPoolStatus(Model):
    observed_generation: int | None = None
    mode: Literal["Auto", "Recommend", "Paused", "Manual"] | None = Field(
        None, description="Auto, Recommend (autoscaling.mode), Paused (the paused annotation) or Manual (disabled)."
    )
    replicas: int | None = None
    ready_replicas: int | None = None
    desired_replicas: int | None = None
    selector: str | None = Field(None, description="Label selector of the pool's pods (scale subresource).")
    depth: int | None = Field(None, description="Messages waiting across all the pool's queues.")
    wait_seconds: float | None = Field(None, description="Age of the oldest waiting message, when known.")
    queues: list[QueueStatus] = Field(default_factory=list)
    arrival_rate: float | None = Field(None, description="Tasks per second arriving.")
    service_time_seconds: float | None = Field(None, description="Mean task run time.")
    workers_online: int | None = None
    worker_startup_seconds: float | None = Field(
        None,
        description="Measured start-up of the pool's new workers: from pod creation (or process start) to the "
        "worker's first event, median of the last few. Used when autoscaling.workerStartupSeconds is unset.",
    )
    last_decision: LastDecision | None = None
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class ObjectMeta(BaseModel):
    """The part of metadata the operator reads; the rest is kept but not interpreted."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: DnsSubdomain
    namespace: DnsLabel = "default"
    annotations: dict[str, str] = Field(default_factory=dict)


class CeleryWorkerPool(Model):
    """A whole resource, as found in a YAML file or in a kopf event body."""

    api_version: Literal["celery-operator.dev/v1alpha1"] = "celery-operator.dev/v1alpha1"
    kind: Literal["CeleryWorkerPool"] = "CeleryWorkerPool"
    metadata: ObjectMeta
    spec: CeleryWorkerPoolSpec
    status: CeleryWorkerPoolStatus | None = None

    @property
    def identity(self) -> PoolIdentity:
        """How the pool's workers are named on the broker (naming.py)."""
        return PoolIdentity(self.metadata.namespace, self.metadata.name)

    RULES = (
        Rule(
            f"self.metadata.name.matches(r'{DNS1123_LABEL}') && self.metadata.name.size() <= 63",
            "metadata.name must be a DNS-1123 label of at most 63 characters: it names the Deployment and workers",
            "",  # the API server allows fieldPath only into fields the schema spells out
            lambda p: re.match(DNS1123_LABEL, p.metadata.name) is not None and len(p.metadata.name) <= 63,
        ),
    )
