"""The `celery-worker-operator` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click
import yaml
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

from .crd import build_crd
from .demo.run import DEMO_POOL, run_demo
from .localmode import LocalRun, NoBrokerURL, local_broker_url, stop_on_signals, with_local_tls
from .logs import LOG_FORMATS, LOG_LEVELS, LogFormat, configure_logging
from .manifests import InvalidPool, check_file, load_pools, manifest_files
from .policy import plan as plan_pool
from .redact import redact
from .simulation.charts import MISSING as MATPLOTLIB_MISSING
from .simulation.charts import can_plot
from .simulation.engine import LOCAL_STARTUP_SECONDS, PoolModel, Result, oracle_worker_seconds, parse_trace
from .simulation.scenarios import SCENARIOS, Scenario, run_scenario
from .spec import BROKER_SCHEME, PATTERN_MEANING, AutoscalingSpec, CeleryWorkerPool
from .status_view import document, pool_view, pools_table
from .template_policy import ALLOWABLE, TemplatePolicy
from .units import parse_duration, parse_rate

if TYPE_CHECKING:
    from .kube_status import PoolReading

MOST_REPLICAS = 10000  # AutoscalingSpec.maxReplicas' bound
# kube-apiserver stores objects nested up to 10,000 levels (a pool's worker.template is free-form), and
# Python's JSON reader, copy.deepcopy and the YAML reader recurse once or twice per level: below this one
# pool could stop kopf's watch, and with it the operator, for every pool (tests/operator/test_fuzz_api.py).
RECURSION_LIMIT = 60000


class BadInput(click.ClickException):
    """Input a command cannot use: one message naming the file, line, field or option; exit code 2."""

    exit_code = 2


class InternalError(click.ClickException):
    """A bug, not the user's input: a one-line summary; `--debug` shows the traceback."""

    exit_code = 1


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


class _Commands(click.Group):
    """Every command's errors take one path: a message and an exit code, never a traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:  # type: ignore[override]
        """Each command takes `-h` itself too, not only through its parent's context (click caches a
        command's help option the first time any context makes it)."""
        kwargs.setdefault("context_settings", HELP_OPTIONS)
        return cast(Callable[[Callable[..., Any]], click.Command], super().command(*args, **kwargs))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (InvalidPool, OSError) as error:
            if ctx.params.get("debug"):
                raise
            raise BadInput(redact(str(error))) from None
        except Exception as error:
            if ctx.params.get("debug"):
                raise
            what = redact(f"{type(error).__name__}: {error}")
            raise InternalError(f"{what} (run with --debug for the traceback)") from None


class _Path(click.Path):
    """click.Path that answers a path the OS cannot take (a NUL byte) with a usage error, not a crash."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except ValueError as error:
            self.fail(f"{value!r} is not a usable path: {error}", param, ctx)


class _Parsed(click.ParamType[float]):
    """A click type from one of the parsers in units.py, from 0 to a bound, so bad input gets a usage error."""

    def __init__(
        self, name: str, parse: Callable[[str], float], unit: str, high: float, *, zero_ok: bool = True
    ) -> None:
        self.name, self.parse, self.unit = name, parse, unit
        self.high, self.zero_ok = high, zero_ok

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            parsed = value if isinstance(value, float) else self.parse(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)
        if parsed > self.high or (parsed == 0 and not self.zero_ok):
            low = "0" if self.zero_ok else f"more than 0{self.unit}"
            self.fail(f"{value!r} is out of range: give {low} to {self.high:g}{self.unit}", param, ctx)
        return parsed


log = logging.getLogger(__name__)
RATE = _Parsed("rate", parse_rate, "/s", 1e9)
TASK_DURATION = _Parsed("duration", parse_duration, " s", 604800, zero_ok=False)
TARGET_WAIT = _Parsed("duration", parse_duration, " s", 86400, zero_ok=False)
STARTUP = _Parsed("duration", parse_duration, " s", 3600)


PEM_FILE = _Path(exists=True, dir_okay=False, path_type=Path)


def _broker_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A broker URL option, checked before anything connects; the message never repeats the URL."""
    if value is not None and not re.match(BROKER_SCHEME, value):
        raise click.BadParameter(f"expected {PATTERN_MEANING[BROKER_SCHEME]}")
    return value


def _template_policy(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> TemplatePolicy:
    """`--allow-template` values (each a comma list, repeatable) as the policy they allow."""
    try:
        return TemplatePolicy.allowing([name for names in value for name in names.split(",")])
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def template_policy_option(command: Callable[..., None]) -> Callable[..., None]:
    """`--allow-template`, the same on `run` and `validate`: what a pool's worker.template may set."""
    return click.option(
        "--allow-template",
        "template_policy",
        multiple=True,
        envvar="CWO_ALLOW_TEMPLATE",
        callback=_template_policy,
        metavar="FIELD[,FIELD...]",
        help="Let pools' worker.template set these (default: none of them): " + ", ".join(ALLOWABLE) + ".",
    )(command)


def logging_options(command: Callable[..., None]) -> Callable[..., None]:
    """`--log-format` and `--log-level`, the same on every long-running command."""
    command = click.option(
        "--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True
    )(command)
    return click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS),
        default="auto",
        show_default=True,
        help="auto: rich on a terminal, `time level logger message` lines elsewhere; json: one object a line.",
    )(command)


@click.group(cls=_Commands, context_settings=HELP_OPTIONS)
@click.version_option(package_name="celery-worker-operator")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of a one-line message.")
def main(debug: bool) -> None:
    """Size, drain and configure Celery worker pools from what the broker and the workers report.

    Every command answers bad input with one message naming the file, line, field or option, and
    exit code 2.
    """
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))


@main.command()
@click.option("--namespace", "namespaces", multiple=True, help="Watch this namespace (repeatable).")
@click.option("--all-namespaces", is_flag=True, help="Watch every namespace (needs the ClusterRole).")
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", show_default=True, help="kopf's liveness URL.")
@click.option("--peering", help="Peering name, to run several replicas with one active; default: standalone.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090, show_default=True, help="Serves /metrics.")
@template_policy_option
@logging_options
def run(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    liveness: str,
    peering: str | None,
    metrics_port: int,
    template_policy: TemplatePolicy,
    log_format: LogFormat,
    log_level: str,
) -> None:
    """Run the operator (kopf embedded) with in-cluster credentials or the current kubeconfig."""
    import kopf
    from kubernetes.config import ConfigException

    from .handlers import registry
    from .kube import Operator, kubernetes_client

    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace NS (one or more) or --all-namespaces")
    configure_logging("text" if log_format == "auto" else log_format, log_level.upper())
    try:
        api = kubernetes_client()
    except ConfigException as error:
        raise BadInput(f"no Kubernetes credentials: not in a pod, and {error}") from None
    state = Operator(api, template_policy=template_policy)
    state.shared.metrics.serve(metrics_port)
    kopf.run(
        registry=registry,
        memo=state,
        clusterwide=all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        standalone=peering is None,
        peering_name=peering,
    )


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (`&id001`), which some kustomize versions refuse."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@main.command()
def crd() -> None:
    """Print the CeleryWorkerPool CustomResourceDefinition (generated from the pydantic models)."""
    click.echo(yaml.dump(build_crd(), Dumper=_PlainDumper, sort_keys=False, width=120), nl=False)


@main.command()
@click.argument("sources", nargs=-1, required=True, type=_Path(exists=True, allow_dash=True, path_type=Path))
@template_policy_option
def validate(sources: tuple[Path, ...], template_policy: TemplatePolicy) -> None:
    """Check pool manifests as the operator would: files, directories (their *.yaml, *.yml) or - for stdin.

    Every problem of every file is reported in one pass; exit code 2 when there is any. worker.template
    is checked against the same policy as `run`'s (--allow-template).
    """
    problems = 0
    for source in sources:
        files = manifest_files(source)
        if not files:
            click.echo(f"{source}: no .yaml or .yml files", err=True)
            problems += 1
        for path in files:
            checked = check_file(path, template_policy)
            for pool in checked.pools:
                click.echo(f"{checked.origin}: CeleryWorkerPool {pool.metadata.name} is valid")
            for problem in checked.problems:
                click.echo(problem, err=True)
            problems += len(checked.problems)
    if problems:
        raise BadInput(f"{problems} problem{'s' if problems > 1 else ''} found")


@main.command()
@click.option(
    "--broker",
    callback=_broker_url,
    help="Broker URL (default: the bundled pool's, a Redis on 127.0.0.1:6379/0).",
)
def demo(broker: str | None) -> None:
    """Scale the bundled demo pool live through a burst, a steady and a quiet phase, then summarize."""
    pool = load_pools(DEMO_POOL)[0]
    url = broker or pool.spec.broker.url or ""
    console = Console()
    configure_logging("auto", logging.ERROR, console)  # workers still booting miss a control reply or two
    console.print(f"demo: pool {pool.metadata.name} on {redact(url)}; Ctrl-C stops it cleanly")
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        summary = run_demo(url, lambda run: live.update(run.view()), console.print)
    console.print("\n".join(summary.lines()))


def _local_pool(pool_file: Path, name: str | None) -> CeleryWorkerPool:
    """The one pool of the file local mode can run: it must start its own workers (spec.worker)."""
    pools = [p for p in load_pools(pool_file) if name is None or p.metadata.name == name]
    if len(pools) != 1:
        raise click.UsageError(f"{pool_file} holds {len(pools)} matching pools: choose one with --name")
    pool = pools[0]
    if pool.spec.worker is None:
        target = pool.spec.scale_target_ref.name if pool.spec.scale_target_ref else "?"
        raise BadInput(
            f"{pool_file}: pool {pool.metadata.name} adopts Deployment {target} (scaleTargetRef): local mode "
            "starts workers from spec.worker, so give the pool a worker section to run it here"
        )
    return pool


@main.command()
@click.argument("pool_file", type=_Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--broker",
    callback=_broker_url,
    help="Broker URL; needed when the pool reads it from a Secret. With usernameFrom/passwordFrom, "
    "CELERY_BROKER_USERNAME/CELERY_BROKER_PASSWORD complete the pool's url instead.",
)
@click.option("--broker-ca", type=PEM_FILE, help="CA certificate(s) of a rediss:// broker (for broker.tls.caFrom).")
@click.option("--broker-cert", type=PEM_FILE, help="Client certificate for a rediss:// broker (broker.tls.certFrom).")
@click.option("--broker-key", type=PEM_FILE, help="Key of the client certificate (broker.tls.keyFrom).")
@click.option("--name", help="Which pool of the file, when it holds several.")
@click.option("--worker-log", type=_Path(dir_okay=False, path_type=Path), help="Append the workers' output here.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), help="Serve /metrics here, as `run` does.")
@logging_options
def local(
    pool_file: Path,
    broker: str | None,
    broker_ca: Path | None,
    broker_cert: Path | None,
    broker_key: Path | None,
    name: str | None,
    worker_log: Path | None,
    metrics_port: int | None,
    log_format: LogFormat,
    log_level: str,
) -> None:
    """Run a pool's control loop on this machine, scaling real `celery worker` processes.

    On a terminal a live view shows the pool; elsewhere (a file, a pipe) only log lines are written,
    one per scale decision among them. SIGTERM, SIGINT (Ctrl-C) and SIGHUP all stop it the same way:
    every worker warm-stops within its grace period, then it exits 0. Killed outright, its workers
    get SIGTERM from the kernel all the same."""
    pool = _local_pool(pool_file, name)
    try:
        url = broker or local_broker_url(pool.spec.broker, os.environ)
        url = with_local_tls(url, pool.spec.broker.tls, broker_ca, broker_cert, broker_key)
    except NoBrokerURL as missing:
        raise click.UsageError(str(missing)) from None
    console = Console()
    live_view = configure_logging(log_format, log_level.upper(), console)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        stack.enter_context(stop_on_signals(stop))  # first in, last out: still in force while workers stop
        output = stack.enter_context(worker_log.open("ab")) if worker_log else None
        run = LocalRun(pool, url, worker_output=output)
        stack.callback(run.close)
        if metrics_port is not None:
            log.info("serving /metrics on port %d", run.metrics.serve(metrics_port))
            stack.callback(run.metrics.stop)
        log.info("pool %s on %s; Ctrl-C stops every worker", pool.metadata.name, redact(url))
        live = stack.enter_context(Live(console=console, refresh_per_second=2)) if live_view else None
        run.run(stop, lambda r: live.update(r.view()) if live else None)


@main.command()
@click.argument("name", required=False)
@click.option("-n", "--namespace", help="The pools' namespace; default: the kubeconfig context's, as kubectl.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Pools of every namespace.")
@click.option("-w", "--watch", "follow", is_flag=True, help="Show again whenever a pool changes; Ctrl-C ends.")
@click.option("-o", "--output", type=click.Choice(["json", "yaml"]), help="The status as stored, with the Events.")
def status(name: str | None, namespace: str | None, all_namespaces: bool, follow: bool, output: str | None) -> None:
    """Show pools as the cluster sees them: queues, rates, replicas, conditions and the latest decisions.

    With NAME one pool in full, without it one line per pool. Reads with the current kubeconfig (or
    in-cluster credentials); also `kubectl cwp status ...` once installed, as a kubectl plugin.
    """
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    from .kube import kubernetes_client
    from .kube_status import PoolNotFound, current_namespace, pool_changes, read_pools

    if name is not None and all_namespaces:
        raise click.UsageError("a NAME is looked up in one namespace: give -n NS instead of -A")
    try:
        api = kubernetes_client()
        scope = None if all_namespaces else namespace or current_namespace()
    except ConfigException as error:
        raise BadInput(f"no Kubernetes credentials: not in a pod, and {error}") from None
    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe gets whole lines

    def show(readings: list[PoolReading]) -> None:
        if output is None:
            console.print(_status_view(readings, name is not None, scope))
        else:
            docs = [document(r.pool, r.events) for r in readings]
            shown: Any = docs[0] if name is not None else {"items": docs}
            text = json.dumps(shown, indent=2) if output == "json" else yaml.dump(shown, Dumper=_PlainDumper)
            click.echo(text)

    try:
        readings = read_pools(api, scope, name)
        show(readings)
        changes = pool_changes(api, scope, name) if follow else iter(())
        for _ in changes:
            latest = read_pools(api, scope, name)
            if latest != readings:
                show(latest)
                readings = latest
    except PoolNotFound as error:
        raise BadInput(str(error)) from None
    except ApiException as error:
        raise BadInput(f"the API server answered {error.status} {error.reason}") from None
    except KeyboardInterrupt:
        pass
    finally:
        api.close()  # type: ignore[no-untyped-call]


def _status_view(readings: Sequence[PoolReading], one: bool, scope: str | None) -> RenderableType:
    """One pool in full, or a line per pool; a sentence when there is none (as kubectl says it)."""
    if one:
        return pool_view(readings[0].pool, readings[0].events, datetime.now(UTC))
    if not readings:
        return f"No CeleryWorkerPools found in {f'namespace {scope}' if scope else 'any namespace'}."
    return pools_table(r.pool for r in readings)


@main.command()
@click.option("--arrival", type=RATE, required=True, help="Arrival rate over the last minute: 5/s, 10/m, 200/h.")
@click.option("--recent", type=RATE, help="Arrival rate over the last few seconds, if known; the lower one is sized.")
@click.option("--duration", type=TASK_DURATION, required=True, help="Mean task duration: 250ms, 30s, 10m.")
@click.option("--concurrency", type=click.IntRange(1, 1000), required=True, help="Task slots per worker.")
@click.option("--target-wait", type=TARGET_WAIT, default="30s", show_default=True, help="Acceptable queue wait.")
@click.option("--utilization", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True)
@click.option("--backlog", type=click.IntRange(0, 10**9), default=0, show_default=True, help="Tasks already waiting.")
@click.option("--oldest", type=TARGET_WAIT, help="How long the oldest waiting task has waited: 5s, 2m.")
@click.option("--startup", type=STARTUP, help="How long a new worker takes to its first task (workerStartupSeconds).")
@click.option(
    "--max-replicas", type=click.IntRange(1, MOST_REPLICAS), default=MOST_REPLICAS, show_default=True, help="The cap."
)
def plan(
    arrival: float,
    recent: float | None,
    duration: float,
    concurrency: int,
    target_wait: float,
    utilization: float,
    backlog: int,
    oldest: float | None,
    startup: float | None,
    max_replicas: int,
) -> None:
    """Size a pool with the capacity formula and show the working."""
    spec = AutoscalingSpec(
        min_replicas=0,
        max_replicas=max_replicas,
        target_wait_seconds=target_wait,
        target_utilization=utilization,
        worker_startup_seconds=startup,
    )
    terms = plan_pool(arrival, duration, backlog, spec, concurrency, recent_rate=recent, oldest_wait=oldest).terms
    offered, steady, drain = terms.offered_load or 0.0, terms.steady_slots or 0.0, terms.backlog_slots or 0.0
    rate = terms.arrival_rate or 0.0
    if recent is not None:
        click.echo(f"arrival rate   lower of {arrival:.4g}/s (minute) and {recent:.4g}/s (recent) = {rate:.4g}/s")
    click.echo(f"offered load   {rate:.4g}/s x {duration:.4g} s = {offered:.4g} busy slots")
    click.echo(f"steady slots   {offered:.4g} / {utilization:.2g} utilization = {steady:.4g}")
    within = terms.drain_seconds or target_wait
    if within < target_wait:
        waited = f" - {oldest:.4g} s waited" if oldest else ""
        started = f" - {terms.startup:.4g} s start-up (the pool grows)" if terms.startup else ""
        click.echo(f"drain within   {target_wait:.4g} s target{waited}{started} = {within:.4g} s (>= half the target)")
    click.echo(f"backlog slots  {backlog} waiting x {duration:.4g} s / {within:.4g} s = {drain:.4g}")
    slots = terms.slots or 0.0
    wanted = math.ceil(slots / concurrency)
    click.echo(f"slots          {slots:.4g}")
    click.echo(f"replicas       ceil({slots:.4g} / {concurrency}) = {wanted}")
    if wanted > max_replicas:
        click.echo(f"capped         at maxReplicas {max_replicas}: the formula asks for {wanted}")
    replicas = min(wanted, max_replicas)
    if replicas < max_replicas:
        click.echo(
            f"between polls  a pass starts at once when more than {max(replicas * concurrency, backlog)} messages "
            f"are ready ({replicas} x {concurrency} slots, {backlog} seen waiting)"
        )


@main.command()
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), help="A bundled workload.")
@click.option("--trace", type=_Path(exists=True, dir_okay=False, path_type=Path), help="CSV: timestamp,task,duration.")
@click.option(
    "--pool",
    "pool_file",
    type=_Path(exists=True, dir_okay=False, path_type=Path),
    help="With --trace: take autoscaling and concurrency from this CeleryWorkerPool.",
)
@click.option(
    "--startup",
    type=STARTUP,
    default="10s",
    show_default=True,
    help=f"With --trace: worker start-up delay (a pod; a local `celery worker` process: {LOCAL_STARTUP_SECONDS:g}s).",
)
@click.option(
    "--policy",
    "policies",
    default="ours,keda-tuned,keda",
    show_default=True,
    help="Comma list: ours, keda, keda-tuned, fixed:N.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--plot", type=_Path(dir_okay=False, path_type=Path), help="Write a PNG chart (needs matplotlib).")
def simulate(
    scenario: str | None,
    trace: Path | None,
    pool_file: Path | None,
    startup: float,
    policies: str,
    seed: int,
    plot: Path | None,
) -> None:
    """Replay a workload through scaling policies and compare waits and cost."""
    if plot and not can_plot():
        raise BadInput(MATPLOTLIB_MISSING)
    if plot and not plot.parent.is_dir():
        raise click.BadParameter(f"{plot.parent} is not a directory", param_hint="--plot")
    chosen = _scenario_from(scenario, trace, pool_file, startup)
    names = [name.strip() for name in policies.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("name at least one policy: ours, keda or fixed:N", param_hint="--policy")
    try:
        results = run_scenario(chosen, names, seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--policy") from None
    oracle = oracle_worker_seconds(chosen.tasks(seed), chosen.pool, chosen.autoscaling.min_replicas, results[0].end)
    Console(width=120).print(comparison_table(chosen, results, oracle))
    for result in results:
        if result.explanation:
            click.echo(
                f"{result.scaler}: {result.early_polls} early passes (a burst between polls); {result.explanation}"
            )
    if plot:
        from .simulation.charts import plot_results

        plot_results(results, plot)
        click.echo(f"chart written to {plot}")


def _scenario_from(scenario: str | None, trace: Path | None, pool_file: Path | None, startup: float) -> Scenario:
    if (scenario is None) == (trace is None):
        raise click.UsageError("give exactly one of --scenario or --trace")
    if scenario is not None:
        return SCENARIOS[scenario]
    assert trace is not None
    if pool_file is None:
        raise click.UsageError("--trace needs --pool, a CeleryWorkerPool whose autoscaling and worker to use")
    pool = load_pools(pool_file)[0]
    try:
        tasks = parse_trace(trace.read_text().splitlines())
    except ValueError as error:  # a bad row, or bytes that are not text
        raise BadInput(f"{trace}: {error}") from None
    concurrency = pool.spec.worker.concurrency if pool.spec.worker else 1
    horizon = max((t.arrival for t in tasks), default=0.0)
    return Scenario(
        trace.name,
        f"{len(tasks)} tasks from {trace}",
        lambda _: tasks,
        PoolModel(concurrency=concurrency, startup_seconds=startup),
        pool.spec.autoscaling,
        horizon,
    )


def comparison_table(scenario: Scenario, results: list[Result], oracle: float) -> Table:
    """One row per policy: waits against the target, seconds over it, cost against the oracle."""
    target = scenario.autoscaling.target_wait_seconds
    table = Table(title=f"{scenario.name}: {scenario.description} (target wait {target:g} s)")
    for column in ("policy", "p50 wait", "p95 wait", "max wait", "s over target", "worker-s", "x oracle", "killed"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for result in results:
        table.add_row(
            result.scaler,
            f"{result.p50:.1f}",
            f"{result.p95:.1f}",
            f"{result.max_wait:.1f}",
            f"{result.seconds_over_target:.0f}",
            f"{result.worker_seconds:.0f}",
            f"{result.worker_seconds / oracle:.2f}" if oracle else "-",
            str(result.killed_tasks),
        )
    table.add_row("oracle", "0.0", "0.0", "0.0", "0", f"{oracle:.0f}", "1.00", "0")
    return table


if __name__ == "__main__":
    main()
