"""Decode speed against context depth, llamba beside llama.cpp, per KV cache type, in the same run.

    python benchmarks/depth.py [--model qwen2.5-coder-0.5b] [--depth 100 --depth 1000 ...] [--kv-type f16 ...]
                               [-n 32] [-t 2] [--rounds 3] [--no-llama-cpp]

Each engine's cache is filled with a prompt (gpl-3.txt's tokens, repeated) up to the first depth, then n decode
steps are timed, the steps are taken back out of the cache, the prompt is extended to the next depth, and so on:
every depth is measured over the same text, and the prompt is evaluated once in all. At each depth the two
engines alternate for --rounds rounds (this machine's speed drifts by 10-30% over seconds); a round's speed is
one over its median step, the table shows the median round. llama.cpp runs through llama-cpp-python with flash attention
on and type_k = type_v = the KV type. llamba runs at a fixed thread count (no governor). The last columns are
each engine's speed against its own at the first depth: what a deep context costs it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click

from llamba import Llama
from llamba.formats.ggml_types import ggml_type
from llamba.memory.kv_cache import KV_TYPES
from llamba.ops.threads import ThreadGovernor
from llamba.store import resolve_model

TEXT = Path(__file__).resolve().parents[1] / "tests" / "reference_data" / "gpl-3.txt"
PREFILL_CHUNK = 512  # prompt tokens per forward while filling the cache (bounds the activations' memory)


class LlambaDepth:
    """llamba's model and one cache, filled step by step to deeper contexts."""

    name = "llamba"

    def __init__(self, model: str, n_ctx: int, kv_type: str, threads: int):
        self.llm = Llama(model, n_ctx=n_ctx, n_threads=threads, kv_type=kv_type)
        self.llm.model.threads = ThreadGovernor(fixed=threads)
        self.cache = self.llm.cache
        self.depth = 0

    def fill(self, ids: list[int], depth: int) -> None:
        """Extend the cached prompt to ids[:depth]."""
        for start in range(self.depth, depth, PREFILL_CHUNK):
            chunk = ids[start : min(depth, start + PREFILL_CHUNK)]
            self.llm.model.forward_tokens(chunk, start, self.cache)
        self.depth = depth

    def decode(self, tokens: list[int]) -> list[float]:
        """Seconds of each single-token forward after the prompt; then the cache holds the prompt alone again."""
        seconds = [_timed(lambda: self.llm.model.forward_tokens([token], self.depth + i, self.cache))
                   for i, token in enumerate(tokens)]
        self.cache.trim(self.depth)
        return seconds


class LlamaCppDepth:
    """The same through llama-cpp-python: eval extends its cache, n_tokens takes the decoded steps back."""

    name = "llama.cpp"

    def __init__(self, model: str, n_ctx: int, kv_type: str, threads: int):
        from llama_cpp import Llama as LlamaCpp

        kv = ggml_type(kv_type).id
        self.llm = LlamaCpp(str(resolve_model(model)), n_ctx=n_ctx, n_batch=PREFILL_CHUNK, n_threads=threads,
                            n_threads_batch=threads, flash_attn=True, type_k=kv, type_v=kv, verbose=False)
        self.depth = 0

    def fill(self, ids: list[int], depth: int) -> None:
        self.llm.eval(ids[self.depth : depth])
        self.depth = depth

    def decode(self, tokens: list[int]) -> list[float]:
        seconds = [_timed(lambda: self.llm.eval([token])) for token in tokens]
        self.llm.n_tokens = self.depth  # the next eval removes the cells past it
        return seconds


def _timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(engines: list, ids: list[int], depths: list[int], n_tokens: int, rounds: int, progress) -> dict:
    """{(engine, depth): tokens per second} at each depth: one over the median step of the median round (a
    machine that others share stalls single steps; the median leaves them out)."""
    steps = [100 + i for i in range(n_tokens)]
    speeds = {}
    for depth in depths:
        for engine in engines:
            engine.fill(ids, depth)
            engine.decode(steps[:2])  # warm: the first steps after a long prompt touch new pages
        per_round = {engine.name: [] for engine in engines}
        for _ in range(rounds):
            for engine in engines:
                per_round[engine.name].append(1 / statistics.median(engine.decode(steps)))
        for engine in engines:
            speeds[engine.name, depth] = statistics.median(per_round[engine.name])
            progress(f"depth {depth} {engine.name}: {speeds[engine.name, depth]:.1f} tok/s")
    return speeds


@click.command()
@click.option("--model", default="qwen2.5-coder-0.5b", show_default=True)
@click.option("--depth", "depths", multiple=True, type=int, default=[100, 1000, 4000, 16000], show_default=True,
              help="Tokens in the cache before the timed steps (repeat the flag).")
@click.option("--kv-type", "kv_types", multiple=True, type=click.Choice(KV_TYPES), default=["f16", "q8_0"],
              show_default=True)
@click.option("-n", "n_tokens", default=32, show_default=True, help="Decode steps per round.")
@click.option("-t", "--threads", default=2, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Alternating rounds of each engine per depth.")
@click.option("--llama-cpp/--no-llama-cpp", default=True, show_default=True)
def main(model, depths, kv_types, n_tokens, threads, rounds, llama_cpp) -> None:
    depths = sorted(depths)
    n_ctx = depths[-1] + n_tokens + 16
    progress = lambda line: click.echo(line, err=True)  # noqa: E731
    rows = []
    for kv_type in kv_types:
        engines = [LlambaDepth(model, n_ctx, kv_type, threads)]
        if llama_cpp:
            engines.append(LlamaCppDepth(model, n_ctx, kv_type, threads))
        ids = (engines[0].llm.tokenize(TEXT.read_text(encoding="utf-8")) * (n_ctx // 1000 + 1))[:n_ctx]
        speeds = measure(engines, ids, depths, n_tokens, rounds, progress)
        rows.append((kv_type, speeds))
        del engines
    click.echo(f"\n{model}, {threads} threads, {n_tokens} decode steps a round, median of {rounds} alternating "
               "rounds: tokens per second\n")
    theirs = " | llama.cpp | llamba / llama.cpp" if llama_cpp else ""
    own = f" | llamba vs depth {depths[0]}" + (f" | llama.cpp vs depth {depths[0]}" if llama_cpp else "")
    click.echo(f"| KV type | depth | llamba{theirs}{own} |")
    n_columns = 6 if llama_cpp else 3
    click.echo("| --- |" + " ---: |" * n_columns)
    for kv_type, speeds in rows:
        for depth in depths:
            ours = speeds["llamba", depth]
            line = f"| {kv_type} | {depth} | {ours:.1f}"
            if llama_cpp:
                peer = speeds["llama.cpp", depth]
                line += f" | {peer:.1f} | {ours / peer:.2f}x"
            line += f" | {ours / speeds['llamba', depths[0]]:.2f}"
            if llama_cpp:
                line += f" | {speeds['llama.cpp', depth] / speeds['llama.cpp', depths[0]]:.2f}"
            click.echo(line + " |")


if __name__ == "__main__":
    main()
