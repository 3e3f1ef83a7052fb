"""Bytes read per generated token, and how close decoding comes to the machine's memory bandwidth.

    python benchmarks/bandwidth.py [--model smollm2-135m --model gemma3-270m] [-n 64] [--context 8]

Decoding one token reads every weight matrix once (the embedding only one row), so its speed is bounded by
bytes per token / read bandwidth. Prints the machine's read bandwidth (a STREAM-style sum over 512 MB at 1
and 2 threads), then per model: the file's tensor bytes, the resident weights (the lanes matrices: an untied
embedding stays in the file), the bytes read per token (ours against the file's for the same matrices, which
is what llama.cpp reads), and decode speed at 1 and 2 threads with the GB/s it achieves, for llamba and
llama-cpp-python measured in the same run. --context: tokens already in the cache when decoding starts
(attention reads the cache as well as the weights: a long chat).
"""

from __future__ import annotations

import statistics
import time

import click
import numba
import numpy as np

from llamba import Llama
from llamba.bench import LlamaCppRunner
from llamba.ops.threads import ThreadGovernor, set_threads
from llamba.memory.kv_cache import KVCache


@numba.njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a, n_parts):
    part = a.shape[0] // n_parts
    sums = np.zeros(n_parts, np.float32)
    for p in numba.prange(n_parts):
        s = np.float32(0.0)
        base = np.uint64(p * part)
        for i in range(np.uint64(part)):  # unsigned: no negative-index check, so the loop vectorizes
            s += a[base + i]
        sums[p] = s
    return sums.sum()


def read_bandwidth(threads: int, repeats: int = 7) -> float:
    """GB/s of a parallel float32 sum over 512 MB (best of the repeats: the machine's capability)."""
    numba.set_num_threads(threads)
    a = np.ones(128 * 2**20, np.float32)
    _stream_sum(a, 64)
    best = min(_timed(lambda: _stream_sum(a, 64)) for _ in range(repeats))
    return a.nbytes / best / 1e9


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes(llm: Llama) -> dict[str, int]:
    model = llm.model
    matrices = [model.output] + [w for layer in model.layers
                                 for w in layer.matrices]
    per_token = sum(w.nbytes for w in matrices)
    # Resident weights are the lanes matrices only: an untied token_embd is a FileRows, left in the file and
    # read a row per token (a few KB, not counted).
    resident = per_token
    tensors = model.gguf.tensors
    file_total = sum(t.n_bytes for t in tensors.values())
    file_per_token = file_total - (tensors["token_embd.weight"].n_bytes if "output.weight" in tensors else 0)
    file_per_token -= sum(t.n_bytes for name, t in tensors.items() if len(t.shape) == 1)  # norms: KB, not read as matrices
    return {"file": file_total, "resident": resident, "per_token": per_token, "file_per_token": file_per_token}


def _prompt(context: int) -> list[int]:
    return [100 + i % 1000 for i in range(context)]


def llamba_decode_seconds(llm: Llama, threads: int, n: int, context: int) -> float:
    """Median seconds per token over n single-token forwards after a prompt of `context` tokens, at a fixed
    thread count."""
    model, governor = llm.model, llm.model.threads
    model.threads = ThreadGovernor(fixed=threads)
    cache = KVCache.for_model(model.hp, context + n + 16)
    model.forward_tokens(_prompt(context), 0, cache)
    times = [_timed(lambda: model.forward_tokens([100 + i], context + i, cache)) for i in range(n)]
    model.threads = governor
    return statistics.median(times)


def llama_cpp_decode_seconds(runner: LlamaCppRunner, n: int, context: int) -> float:
    runner.llm.reset()
    runner.llm.eval(_prompt(context))
    return statistics.median(_timed(lambda: runner.llm.eval([100 + i])) for i in range(n))


@click.command()
@click.option("--model", "models", multiple=True, default=["smollm2-135m", "gemma3-270m"])
@click.option("-n", "n_tokens", default=64, show_default=True)
@click.option("--context", default=8, show_default=True,
              help="tokens in the cache before decoding starts (the GB/s columns count the weights only)")
@click.option("--rounds", default=5, show_default=True, help="alternating rounds of each runtime (medians)")
def main(models, n_tokens, context, rounds) -> None:
    bandwidth = {t: read_bandwidth(t) for t in (1, 2)}
    click.echo(f"read bandwidth (STREAM-style sum, best of 7): 1 thread {bandwidth[1]:.1f} GB/s, "
               f"2 threads {bandwidth[2]:.1f} GB/s\n")
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    size_rows, speed_rows = [], []
    for name in models:
        llm = Llama(name, n_threads=2)
        sizes = weight_bytes(llm)
        size_rows.append((llm.model_path.name, sizes))
        for threads in (1, 2):
            set_threads(threads)
            peer = LlamaCppRunner(llm.model_path, threads, n_ctx=context + n_tokens + 16)
            ours, theirs = [], []
            for _ in range(rounds):  # alternating: this machine's speed drifts by 10-30% over seconds
                ours.append(llamba_decode_seconds(llm, threads, n_tokens, context))
                theirs.append(llama_cpp_decode_seconds(peer, n_tokens, context))
            ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
            speed_rows.append((llm.model_path.name, threads, ours_s, theirs_s, sizes, bandwidth[threads]))
            del peer
    click.echo("| model | file tensors | resident weights | read per token | file's bytes for those | ratio |")
    click.echo("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, s in size_rows:
        click.echo(f"| {name} | {mb(s['file'])} | {mb(s['resident'])} ({s['resident'] / s['file']:.2f}x file) | "
                   f"{mb(s['per_token'])} | {mb(s['file_per_token'])} | {s['per_token'] / s['file_per_token']:.2f} |")
    click.echo("\n| model | threads | llamba ms/token | GB/s | llama.cpp ms/token | GB/s | llamba speed-up | "
               "llamba share of read bandwidth |")
    click.echo("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, threads, ours, theirs, s, bw in speed_rows:
        ours_gbs, theirs_gbs = s["per_token"] / ours / 1e9, s["file_per_token"] / theirs / 1e9
        click.echo(f"| {name} | {threads} | {ours * 1e3:.2f} | {ours_gbs:.1f} | {theirs * 1e3:.2f} | {theirs_gbs:.1f} | "
                   f"{theirs / ours:.2f}x | {ours_gbs / bw:.0%} |")


if __name__ == "__main__":
    main()
