"""The `celery-worker-operator` command line."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from .crd import build_crd
from .demo.run import DEMO_POOL, run_demo
from .localmode import LocalRun
from .manifests import InvalidPool, load_pools
from .policy import plan as plan_pool
from .redact import redact
from .simulation.engine import LOCAL_STARTUP_SECONDS, PoolModel, Result, oracle_worker_seconds, parse_trace
from .simulation.scenarios import SCENARIOS, Scenario, run_scenario
from .spec import AutoscalingSpec
from .units import parse_duration, parse_rate


class _Parsed(click.ParamType[float]):
    """A click type from one of the parsers in units.py, so bad input gets click's usage error."""

    def __init__(self, name: str, parse: Callable[[str], float]) -> None:
        self.name, self.parse = name, parse

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return self.parse(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


RATE = _Parsed("rate", parse_rate)
DURATION = _Parsed("duration", parse_duration)


@click.group()
@click.version_option(package_name="celery-worker-operator")
def main() -> None:
    """Size, drain and configure Celery worker pools from what the broker and the workers report."""


@main.command()
@click.option("--namespace", "namespaces", multiple=True, help="Watch this namespace (repeatable).")
@click.option("--all-namespaces", is_flag=True, help="Watch every namespace (needs the ClusterRole).")
@click.option("--liveness", default="http://0.0.0.0:8080/healthz", show_default=True, help="kopf's liveness URL.")
@click.option("--peering", help="Peering name, to run several replicas with one active; default: standalone.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9090, show_default=True, help="Serves /metrics.")
def run(
    namespaces: tuple[str, ...], all_namespaces: bool, liveness: str, peering: str | None, metrics_port: int
) -> None:
    """Run the operator (kopf embedded) with in-cluster credentials or the current kubeconfig."""
    import kopf

    from .handlers import registry
    from .kube import Operator, kubernetes_client

    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give --namespace NS (one or more) or --all-namespaces")
    state = Operator(kubernetes_client())
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


@main.command()
def crd() -> None:
    """Print the CeleryWorkerPool CustomResourceDefinition (generated from the pydantic models)."""
    click.echo(yaml.safe_dump(build_crd(), sort_keys=False, width=120), nl=False)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check pool manifests as the operator would; exit 1 naming each bad field."""
    failed = False
    for path in files:
        try:
            pools = load_pools(path)
        except InvalidPool as error:
            click.echo(f"{path}: {error}", err=True)
            failed = True
            continue
        for pool in pools:
            click.echo(f"{path}: CeleryWorkerPool {pool.metadata.name} is valid")
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--broker", help="Broker URL (default: the bundled pool's, a Redis on 127.0.0.1:6379/0).")
def demo(broker: str | None) -> None:
    """Scale the bundled demo pool live through a burst, a steady and a quiet phase, then summarize."""
    pool = load_pools(DEMO_POOL)[0]
    url = broker or pool.spec.broker.url or ""
    console = Console()
    _log_to(console, logging.ERROR)  # workers still booting miss a control reply or two: not news in a demo
    console.print(f"demo: pool {pool.metadata.name} on {redact(url)}; Ctrl-C stops it cleanly")
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        summary = run_demo(url, lambda run: live.update(run.view()), console.print)
    console.print("\n".join(summary.lines()))


def _log_to(console: Console, level: int) -> None:
    """Log lines printed above the live view instead of through it."""
    logging.basicConfig(level=level, handlers=[RichHandler(console=console, show_path=False)], force=True)


@main.command()
@click.argument("pool_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--broker", help="Broker URL; needed when the pool reads it from a Secret (urlFrom).")
@click.option("--name", help="Which pool of the file, when it holds several.")
@click.option("--worker-log", type=click.Path(dir_okay=False, path_type=Path), help="Append the workers' output here.")
def local(pool_file: Path, broker: str | None, name: str | None, worker_log: Path | None) -> None:
    """Run a pool's control loop on this machine, scaling real `celery worker` processes."""
    pools = [p for p in load_pools(pool_file) if name is None or p.metadata.name == name]
    if len(pools) != 1:
        raise click.UsageError(f"{pool_file} holds {len(pools)} matching pools: choose one with --name")
    pool = pools[0]
    url = broker or pool.spec.broker.url
    if not url:
        raise click.UsageError("this pool reads its broker URL from a Secret: give it with --broker")
    console = Console()
    _log_to(console, logging.WARNING)
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(worker_log.open("ab")) if worker_log else None
        run = LocalRun(pool, url, worker_output=output)
        stack.callback(run.close)
        console.print(f"local: pool {pool.metadata.name} on {redact(url)}; Ctrl-C stops every worker")
        live = stack.enter_context(Live(console=console, refresh_per_second=2))
        try:
            run.run(stop, lambda r: live.update(r.view()))
        except KeyboardInterrupt:
            console.print("stopping workers...")


@main.command()
@click.option("--arrival", type=RATE, required=True, help="Arrival rate over the last minute: 5/s, 10/m, 200/h.")
@click.option("--recent", type=RATE, help="Arrival rate over the last few seconds, if known; the lower one is sized.")
@click.option("--duration", type=DURATION, required=True, help="Mean task duration: 250ms, 30s, 10m.")
@click.option("--concurrency", type=click.IntRange(min=1), required=True, help="Task slots per worker.")
@click.option("--target-wait", type=DURATION, default="30s", show_default=True, help="Acceptable queue wait.")
@click.option("--utilization", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True)
@click.option("--backlog", type=click.IntRange(min=0), default=0, show_default=True, help="Tasks already waiting.")
def plan(
    arrival: float,
    recent: float | None,
    duration: float,
    concurrency: int,
    target_wait: float,
    utilization: float,
    backlog: int,
) -> None:
    """Size a pool with the capacity formula and show the working."""
    spec = AutoscalingSpec(
        min_replicas=0, max_replicas=10000, target_wait_seconds=target_wait, target_utilization=utilization
    )
    terms = plan_pool(arrival, duration, backlog, spec, concurrency, recent_rate=recent).terms
    if terms.offered_load is not None and terms.steady_slots is not None and terms.backlog_slots is not None:
        rate = terms.arrival_rate or 0.0
        if recent is not None:
            click.echo(f"arrival rate   lower of {arrival:.4g}/s (minute) and {recent:.4g}/s (recent) = {rate:.4g}/s")
        click.echo(f"offered load   {rate:.4g}/s x {duration:.4g} s = {terms.offered_load:.4g} busy slots")
        click.echo(
            f"steady slots   {terms.offered_load:.4g} / {utilization:.2g} utilization = {terms.steady_slots:.4g}"
        )
        click.echo(
            f"backlog slots  {backlog} waiting x {duration:.4g} s / {target_wait:.4g} s = {terms.backlog_slots:.4g}"
        )
    else:  # no task duration: the formula falls back to counting what waits
        click.echo(f"no task duration: {backlog} waiting / {utilization:.2g} utilization")
    slots = terms.slots or 0.0
    click.echo(f"slots          {slots:.4g}")
    click.echo(f"replicas       ceil({slots:.4g} / {concurrency}) = {terms.recommendation}")


@main.command()
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), help="A bundled workload.")
@click.option(
    "--trace", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CSV: timestamp,task,duration."
)
@click.option(
    "--pool",
    "pool_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --trace: take autoscaling and concurrency from this CeleryWorkerPool.",
)
@click.option(
    "--startup",
    type=DURATION,
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
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG chart (needs matplotlib).")
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
    chosen = _scenario_from(scenario, trace, pool_file, startup)
    names = [name.strip() for name in policies.split(",") if name.strip()]
    try:
        results = run_scenario(chosen, names, seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--policy") from None
    oracle = oracle_worker_seconds(chosen.tasks(seed), chosen.pool, chosen.autoscaling.min_replicas, results[0].end)
    Console(width=120).print(comparison_table(chosen, results, oracle))
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
    tasks = parse_trace(trace.read_text().splitlines())
    if pool_file is None:
        raise click.UsageError("--trace needs --pool, a CeleryWorkerPool whose autoscaling and worker to use")
    pool = load_pools(pool_file)[0]
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
