"""`llamba perplexity`: llama.cpp-style perplexity of a text."""

from __future__ import annotations

import json
import time

import click

from ..generation.perplexity import perplexity
from .common import model_options, open_llama, read_text_option


@click.command(name="perplexity")
@model_options
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False), help="The text (default: standard input).")
@click.option("--chunks", type=int, default=None, help="Score at most this many chunks.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ppl": ..., "chunks": ...}.')
def perplexity_cmd(model, ctx_size, threads, chat_template, kv_type, path, chunks, as_json) -> None:
    """Perplexity over non-overlapping chunks of -c tokens (default 512), scoring each chunk's second half."""
    n_ctx = ctx_size or 512
    text = read_text_option(None, path)
    llm = open_llama(model, n_ctx, threads, chat_template, quiet=as_json, kv_type=kv_type)
    started = time.perf_counter()

    def progress(done: int, total: int, ppl: float) -> None:
        if not as_json:
            click.echo(f"\r[{done}/{total}] ppl {ppl:.4f}  ({time.perf_counter() - started:.0f} s)", nl=False, err=True)

    result = perplexity(llm.model, llm.tokenizer, llm.model.new_cache(n_ctx, kv_type), text, n_ctx, chunks, progress)
    if as_json:
        click.echo(json.dumps({"ppl": result.ppl, "chunks": result.chunks, "tokens_scored": result.tokens_scored,
                               "n_ctx": n_ctx}))
    else:
        click.echo(err=True)
        click.echo(f"perplexity {result.ppl:.4f} over {result.chunks} chunks of {n_ctx} tokens "
                   f"({result.tokens_scored} scored, {time.perf_counter() - started:.1f} s)")


COMMANDS = [perplexity_cmd]
