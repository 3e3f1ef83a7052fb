"""What each KV cache type costs in perplexity, llamba beside llama.cpp, in the same run.

    python benchmarks/kv_types.py [--model qwen2.5-coder-0.5b ...] [--chunks 6] [-c 512] [-t 2]

Perplexity on tests/reference_data/gpl-3.txt by llama-perplexity's rule (chunks of -c tokens, the second half
of each scored), for every KV type, as a delta against the same engine's f32 cache. llama.cpp runs through
llama-cpp-python with flash attention on (it needs it for quantized values) and type_k = type_v; its
perplexity is computed here from its logits with the same chunking. Then decode speed at a short depth for
each llamba KV type, as a ratio against llamba's f16 (quantized attention must not slow short contexts).
Prints Markdown tables.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import numpy as np

from llamba import Llama
from llamba.formats.ggml_types import ggml_type
from llamba.generation.perplexity import perplexity
from llamba.memory.batch import Batch
from llamba.memory.kv_cache import KV_TYPES
from llamba.store import resolve_model

TEXT = Path(__file__).resolve().parents[1] / "tests" / "reference_data" / "gpl-3.txt"


def llamba_perplexities(name: str, n_ctx: int, chunks: int, threads: int) -> dict[str, float]:
    llm = Llama(name, n_ctx=n_ctx, n_threads=threads, kv_type="q8_0")  # q8_0: the keys' calibration measured
    text = TEXT.read_text(encoding="utf-8")
    return {t: perplexity(llm.model, llm.tokenizer, llm.model.new_cache(n_ctx, t), text, n_ctx, chunks).ppl
            for t in KV_TYPES}


def llama_cpp_perplexities(name: str, n_ctx: int, chunks: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama as LlamaCpp

    text = TEXT.read_text(encoding="utf-8")
    out = {}
    for t in KV_TYPES:
        llm = LlamaCpp(str(resolve_model(name)), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, logits_all=True,
                       flash_attn=True, type_k=ggml_type(t).id, type_v=ggml_type(t).id, verbose=False)
        out[t] = _llama_cpp_perplexity(llm, text, n_ctx, chunks)
        del llm
    return out


def _llama_cpp_perplexity(llm, text: str, n_ctx: int, max_chunks: int) -> float:
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    adds_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    nll, count = 0.0, 0
    for c in range(min(len(tokens) // n_ctx, max_chunks)):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
        llm.reset()
        llm.eval([llm.token_bos(), *chunk[1:]] if adds_bos else chunk)
        rows = np.array(llm.scores[n_ctx // 2: n_ctx - 1], dtype=np.float64)
        top = rows.max(axis=1)
        log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        nll += float((log_norm - rows[np.arange(len(rows)), chunk[n_ctx // 2 + 1:]]).sum())
        count += len(rows)
    return math.exp(nll / count)


def decode_speed(name: str, kv_type: str, depth: int, n_tokens: int, threads: int) -> float:
    """Tokens per second of greedy single-token steps after a prompt of `depth` tokens."""
    llm = Llama(name, n_ctx=depth + n_tokens + 8, n_threads=threads, kv_type=kv_type)
    ids = (llm.tokenize(TEXT.read_text(encoding="utf-8")) * 4)[:depth]
    logits = llm.model.forward(Batch.chain(ids, 0), llm.cache)
    started = time.perf_counter()
    for i in range(n_tokens):
        logits = llm.model.forward(Batch.chain([int(np.argmax(logits))], depth + i), llm.cache)
    return n_tokens / (time.perf_counter() - started)


@click.command()
@click.option("--model", "models", multiple=True, default=["qwen2.5-coder-0.5b"], show_default=True)
@click.option("-c", "--ctx-size", "n_ctx", default=512, show_default=True)
@click.option("--chunks", default=6, show_default=True)
@click.option("-t", "--threads", default=2, show_default=True)
@click.option("--depth", default=100, show_default=True, help="Context depth of the decode speed runs.")
@click.option("-n", "n_tokens", default=64, show_default=True, help="Tokens per decode speed run.")
def main(models, n_ctx, chunks, threads, depth, n_tokens) -> None:
    print(f"perplexity, gpl-3.txt, -c {n_ctx}, {chunks} chunks; delta against the same engine's f32 cache\n")
    print("| model | KV type | llamba ppl | llamba delta | llama.cpp ppl | llama.cpp delta |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in models:
        ours = llamba_perplexities(name, n_ctx, chunks, threads)
        theirs = llama_cpp_perplexities(name, n_ctx, chunks, threads)
        for t in KV_TYPES:
            print(f"| {name} | {t} | {ours[t]:.4f} | {100 * (ours[t] / ours['f32'] - 1):+.2f}% "
                  f"| {theirs[t]:.4f} | {100 * (theirs[t] / theirs['f32'] - 1):+.2f}% |", flush=True)
    print(f"\ndecode at depth {depth}, {n_tokens} tokens, {threads} threads: llamba's KV types against its f16\n")
    print("| model | KV type | tok/s | vs f16 |")
    print("| --- | --- | ---: | ---: |")
    for name in models:
        speeds = {t: decode_speed(name, t, depth, n_tokens, threads) for t in KV_TYPES}
        for t in KV_TYPES:
            print(f"| {name} | {t} | {speeds[t]:.1f} | {speeds[t] / speeds['f16']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
