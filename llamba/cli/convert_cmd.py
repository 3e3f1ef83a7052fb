"""`llamba convert`, `llamba quantize`, `llamba export`: making model files."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..convert.types import OUTPUT_TYPES
from ..formats.hf import EXPORT_DTYPES
from ..store import resolve_model
from .common import status_line


def _progress(verb: str):
    """The status line's tensors and MiB done (None when standard error is not a terminal)."""
    line = status_line()
    if line is None:
        return None

    def show(done: int, count: int, done_bytes: int, total_bytes: int, name: str) -> None:
        share = done_bytes / total_bytes if total_bytes else 1.0
        line(f"{verb} {done}/{count} tensors, {done_bytes / 2**20:,.0f}/{total_bytes / 2**20:,.0f} MiB "
             f"({share:.0%}) {name}")
    return show


def _done(progress, path: Path, started: float) -> None:
    if progress:
        click.echo("\r\033[K", nl=False, err=True)
    size = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    click.echo(f"wrote {path} ({size / 2**20:,.1f} MiB) in {time.perf_counter() - started:.1f} s")


@click.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The GGUF file to write.")
@click.option("--type", "output_type", type=click.Choice(OUTPUT_TYPES, case_sensitive=False), default="f16",
              show_default=True, help="Type of the weights (q4_k_m: llama.cpp's mix of Q4_K and Q6_K).")
def convert(checkpoint: Path, out: Path, output_type: str) -> None:
    """Convert a Hugging Face CHECKPOINT folder (config.json, *.safetensors, tokenizer) to GGUF."""
    from ..convert import convert as run

    started, progress = time.perf_counter(), _progress("converting")
    _done(progress, run(checkpoint, out, output_type, progress=progress), started)


@click.command()
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output_type", metavar="TYPE", type=click.Choice(OUTPUT_TYPES, case_sensitive=False))
def quantize(source: str, out: Path, output_type: str) -> None:
    """Write SOURCE (a GGUF path or a known name) to OUT with its weights in TYPE."""
    from ..convert import requantize

    path = resolve_model(source, say=lambda m: click.echo(m, err=True))
    started, progress = time.perf_counter(), _progress("quantizing")
    _done(progress, requantize(path, out, output_type, progress=progress), started)


@click.command()
@click.argument("source")
@click.argument("folder", type=click.Path(dir_okay=True, file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(tuple(EXPORT_DTYPES)), default="f32", show_default=True,
              help="Type of the exported weights (f32 keeps the dequantized values exactly).")
def export(source: str, folder: Path, dtype: str) -> None:
    """Write SOURCE (a GGUF path or a known name) as a Hugging Face checkpoint in FOLDER."""
    from ..convert import export as run

    path = resolve_model(source, say=lambda m: click.echo(m, err=True))
    started, progress = time.perf_counter(), _progress("exporting")
    _done(progress, run(path, folder, dtype, progress=progress), started)


COMMANDS = [convert, quantize, export]
