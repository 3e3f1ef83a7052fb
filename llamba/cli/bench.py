"""`llamba bench`: prompt and generation speed, optionally against llama.cpp in the same run."""

from __future__ import annotations

import json

import click

from ..bench import LlamaCppRunner, LlambaRunner, markdown_table, run_bench
from ..memory.kv_cache import KV_TYPES
from .common import open_llama


@click.command()
@click.argument("model", required=False)
@click.option("-p", "--n-prompt", type=click.IntRange(0, 4096), default=128, show_default=True, help="Prompt tokens (pp test; 0: skip).")
@click.option("-n", "--n-gen", type=click.IntRange(0, 4096), default=64, show_default=True, help="Generated tokens (tg test; 0: skip).")
@click.option("-r", "--repetitions", type=click.IntRange(1, 1000), default=3, show_default=True)
@click.option("-t", "--threads", type=click.IntRange(min=1), multiple=True, help="Thread counts to test (repeatable; default: all cores).")
@click.option("--compare-llama-cpp", is_flag=True, help="Also run llama-cpp-python on the same file, interleaved.")
@click.option("--kv-type", type=click.Choice(KV_TYPES), default="f32", show_default=True,
              help="KV cache type (llama.cpp's type_k and type_v too, with flash attention for quantized ones).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def bench(model, n_prompt, n_gen, repetitions, threads, compare_llama_cpp, kv_type, as_json) -> None:
    """Tokens per second for pp (prompt processing) and tg (generation), llama-bench style."""
    from ..errors import LlambaError
    from ..ops.threads import set_threads

    if n_prompt + n_gen > 1000:  # each range is checked by its option
        raise LlambaError(f"-p + -n must be at most 1000 (got {n_prompt + n_gen})")
    llm = open_llama(model, 1024, threads[0] if threads else None, None, quiet=as_json, kv_type=kv_type)
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    records, tables = [], []
    for n_threads in threads or (llm.n_threads,):
        n_threads = set_threads(n_threads)
        runners = {"llamba": LlambaRunner(llm)}
        if compare_llama_cpp:
            runners["llama.cpp"] = LlamaCppRunner(llm.model_path, n_threads, kv_type=kv_type)
        results = run_bench(runners, llm.model.hp.n_vocab, n_prompt, n_gen, repetitions, say)
        tables.append(markdown_table(llm.model_path.name, n_threads, results))
        records += [{"engine": m.engine, "test": m.test, "threads": n_threads, "tok_per_s": m.rates,
                     "mean": m.mean, "stdev": m.stdev} for m in results]
    if as_json:
        click.echo(json.dumps({"model": str(llm.model_path), "results": records}, indent=2))
    else:
        click.echo("\n\n".join(tables))


COMMANDS = [bench]
