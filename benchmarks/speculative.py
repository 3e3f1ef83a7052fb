"""Guessing ahead, measured: what a batch of k tokens costs against one, and each decoder's speed-up over plain
greedy decoding on four kinds of work, in the same run, with a check that the output is identical.

    python benchmarks/speculative.py [--model smollm2-135m --model gemma3-270m] [-n 256] [-t 2]
        [--decoding auto --decoding draft:MODEL ...] [--draft MODEL] [--workload chat ...]

Prints two Markdown tables. Speed is a ratio against plain greedy measured in this run (machines are noisy).
"""

from __future__ import annotations

import time

import click
import numpy as np

from llamba import Llama
from llamba.memory.batch import Batch
from llamba.memory.kv_cache import KVCache

CODE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = sum(values[:window])
    out.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out
'''
QUOTE = ("The committee met on Tuesday. It decided that the bridge on Mill Road will close for repairs from "
         "the first of June until the end of August, that buses will take the route along the river instead, "
         "and that the library will stay open late on Thursdays while the works go on. The chair said that "
         "the closure was regrettable but necessary, because the inspection found cracks in two supports.")
WORKLOADS = {
    "code rewriting": f"Rename the function below to rolling_mean and change nothing else. Repeat the whole code.\n\n{CODE}",
    "renaming a variable": f"In the code below, rename the variable total to running_sum. Reply with the whole code.\n\n{CODE}",
    "adding type hints": f"Add type hints to this function. Reply with the whole code and nothing else.\n\n{CODE}",
    "quoting": f"Summarise this notice, quoting its sentences exactly:\n\n{QUOTE}",
    "chat": "What are three good habits for staying healthy while working at a desk? Explain each briefly.",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
DECODERS = ("prompt-lookup", "lookahead", "self-spec", "auto")


def batch_costs(llm: Llama, sizes=(1, 2, 4, 8, 16), repeats: int = 9) -> dict[int, float]:
    """Median seconds of a forward of k tokens after a 64-token context."""
    model = llm.model
    cache = KVCache.for_model(model.hp, 256)
    context = list(np.random.default_rng(0).integers(10, 1000, 64))
    model.forward_tokens(context, 0, cache)
    costs = {}
    for k in sizes:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.forward(Batch.chain(list(range(20, 20 + k)), 64, logits="all"), cache)
            times.append(time.perf_counter() - t0)
            cache.remove(0, 64)
        costs[k] = float(np.median(times))
    return costs


def run_decoder(llm: Llama, prompt_ids: list[int], n: int, decoding: str) -> tuple[list[int], float, float]:
    """(tokens, seconds after the first token, tokens per step)."""
    llm.reset()
    tokens = [s.token for s in llm.stream_tokens(prompt_ids, max_tokens=n, temperature=0, decoding=decoding)
              if s.token >= 0]
    return tokens, llm.last_stats.generate_seconds, llm.last_stats.tokens_per_step


def copy_bound(prompt_ids: list[int], output: list[int]) -> float:
    """Tokens per step that no guesser copying earlier text can beat on this output: a token that never
    followed its predecessor before (in the prompt or the output so far) cannot be a copied guess, so it is
    the token a step samples itself, one per step at least."""
    seen = set(zip(prompt_ids, prompt_ids[1:]))
    new, previous = 0, prompt_ids[-1]
    for token in output:
        new += (previous, token) not in seen
        seen.add((previous, token))
        previous = token
    return len(output) / max(new, 1)


def warm_up(llm: Llama, prompt_ids: list[int], decoders) -> dict[str, float]:
    """Run every decoder once (self-spec measures its layers at its first guess); seconds each took."""
    took = {}
    for decoding in ["greedy", *decoders]:
        t0 = time.perf_counter()
        run_decoder(llm, prompt_ids, 16, decoding)
        took[decoding] = time.perf_counter() - t0
    return took


@click.command()
@click.option("--model", "models", multiple=True, default=["smollm2-135m", "gemma3-270m"])
@click.option("-n", "n_tokens", default=256, show_default=True)
@click.option("-t", "threads", default=2, show_default=True)
@click.option("--decoding", "decoders", multiple=True, default=DECODERS, show_default=True,
              help="decoders to compare with greedy (draft:MODEL too)")
@click.option("--draft", default="none", show_default=True, help="the draft model auto asks where nothing can be copied")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(list(WORKLOADS)), default=list(WORKLOADS))
@click.option("-r", "repeats", default=5, show_default=True,
              help="runs per decoder, interleaved; the median counts (3 left the median 10% apart between runs)")
def main(models, n_tokens, threads, decoders, draft, workloads, repeats) -> None:
    cost_rows, rows, warm = [], [], []
    for name in models:
        llm = Llama(name, n_ctx=2048, n_threads=threads, draft_model=draft)
        costs = batch_costs(llm)
        cost_rows.append((name, costs))
        first = llm.chat_prompt_ids([{"role": "user", "content": next(iter(WORKLOADS.values()))}])
        warm.append((name, warm_up(llm, first, decoders)))
        for workload in workloads:
            text = WORKLOADS[workload]
            ids = llm.chat_prompt_ids([{"role": "user", "content": text}])
            runs = {d: [] for d in ["greedy", *decoders]}
            for _ in range(repeats):  # interleaved, so a noisy moment hits every decoder alike
                for decoding in runs:
                    runs[decoding].append(run_decoder(llm, ids, n_tokens, decoding))
            plain = runs["greedy"][0][0]
            plain_s = float(np.median([r[1] for r in runs["greedy"]]))
            for decoding in decoders:
                seconds = float(np.median([r[1] for r in runs[decoding]]))
                same = all(r[0] == plain for r in runs[decoding] + runs["greedy"])
                per_step = float(np.median([r[2] for r in runs[decoding]]))
                rows.append((name, workload, decoding, per_step, copy_bound(ids, plain),
                             plain_s / seconds if seconds else 0.0, "yes" if same else "NO", len(plain)))
    click.echo("\n| model | " + " | ".join(f"{k} tokens" for k in cost_rows[0][1]) + " |")
    click.echo("| --- |" + " ---: |" * len(cost_rows[0][1]))
    for name, costs in cost_rows:
        one = costs[1]
        click.echo(f"| {name} | " + " | ".join(f"{c * 1e3:.1f} ms ({c / one:.2f}x)" for c in costs.values()) + " |")
    click.echo("\nFirst 16-token run of each decoder (self-spec measures which layers to skip then):")
    for name, took in warm:
        click.echo(f"  {name}: " + ", ".join(f"{d} {s:.2f} s" for d, s in took.items()))
    click.echo("\nCopying bound: the most tokens per step any guesser copying earlier text could reach on that answer.")
    click.echo("\n| model | workload | decoder | tokens per step | copying bound | speed-up over greedy | identical | tokens |")
    click.echo("| --- | --- | --- | ---: | ---: | ---: | --- | ---: |")
    for name, workload, decoding, per_step, bound, speedup, same, n in rows:
        click.echo(f"| {name} | {workload} | {decoding} | {per_step:.2f} | {bound:.2f} | {speedup:.2f}x | {same} | {n} |")


if __name__ == "__main__":
    main()
