"""`llamba info`: what a model file holds."""

from __future__ import annotations

import json

import click

from ..formats.describe import TOKENIZER_KINDS, describe, human_count
from ..formats.gguf import open_gguf
from ..store import resolve_model


@click.command()
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--no-tensors", is_flag=True, help="Leave out the tensor table.")
def info(model: str | None, as_json: bool, no_tensors: bool) -> None:
    """Architecture, size, context, tokenizer and tensors of MODEL (a GGUF path or a known name)."""
    summary = describe(open_gguf(resolve_model(model, say=lambda m: click.echo(m, err=True))))
    if no_tensors:
        summary.pop("tensors")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = [
        ("file", summary["path"]),
        ("architecture", summary["architecture"]),
        ("name", summary["name"]),
        ("parameters", human_count(summary["parameters"])),
        ("context length", summary["context_length"]),
        ("embedding length", summary["embedding_length"]),
        ("layers", summary["block_count"]),
        ("heads (kv)", f"{summary['head_count']} ({summary['head_count_kv']})"),
        *([("experts", f"{summary['expert_count']} ({summary['expert_used_count']} per token, "
                       f"{human_count(summary['active_parameters'])} parameters active)")]
          if summary["expert_count"] else []),
        ("tokenizer", f"{TOKENIZER_KINDS.get(summary['tokenizer'], summary['tokenizer'])}, pre={summary['tokenizer_pre']}"),
        ("vocabulary", summary["vocab_size"]),
        ("chat template", "yes" if summary["chat_template"] else "no (a built-in one is used)"),
        ("file type", summary["file_type"]),
        ("size", f"{summary['file_bytes'] / 2**20:.1f} MiB"),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")
    if not no_tensors:
        click.echo()
        click.echo("| tensor | type | shape | bytes |")
        click.echo("| --- | --- | --- | ---: |")
        for t in summary["tensors"]:
            click.echo(f"| {t['name']} | {t['type']} | {' x '.join(map(str, t['shape']))} | {t['bytes']} |")


COMMANDS = [info]
