"""The `celery-worker-operator` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from .crd import build_crd
from .manifests import InvalidPool, load_pools

EXAMPLE_POOL = Path(__file__).parent / "examples" / "demo-pool.yaml"


@click.group()
@click.version_option(package_name="celery-worker-operator")
def main() -> None:
    """Size, drain and configure Celery worker pools from what the broker and the workers report."""


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
@click.option("--pool", "pool_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=EXAMPLE_POOL)
def demo(pool_file: Path) -> None:
    """Show the pool the demo runs (the bundled one unless --pool is given), with every default filled in."""
    for pool in load_pools(pool_file):
        document = pool.model_dump(by_alias=True, exclude_none=True, exclude={"status"})
        click.echo(yaml.safe_dump(document, sort_keys=False), nl=False)
