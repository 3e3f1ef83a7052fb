"""Constrained vs free decoding: tokens per second, and what the grammar mask costs per token.

    python benchmarks/constrained.py [MODEL] [-n 96] [-r 3] [--no-llama-cpp]

Greedy, the same chat prompt, its tokens already in the cache (a warm-up call evaluates it): only generation
is timed. Rows: llamba free, llamba under a JSON schema, the same under `--decoding auto`, and (unless
--no-llama-cpp) llama-cpp-python free and under the same schema (its response_format, llama.cpp's own GBNF
grammar sampler), all in this run. The mask cost is the time in GrammarMask's apply and accept per token
(llguidance's mask, unpacking it to a bool per vocabulary entry, the -inf where it says no, the matcher
consuming the token), as a share of a free decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time

from llamba import Llama
from llamba.generation.constraints import GrammarMask
from llamba.store import resolve_model

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "country", "population", "landmarks", "founded", "description"],
          "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                         "population": {"type": "integer"}, "founded": {"type": "integer"},
                         "landmarks": {"type": "array", "items": {"type": "string"}},
                         "description": {"type": "string"}}}
MESSAGES = [{"role": "user", "content": "Describe the city of Paris as a JSON object with its name, country, "
                                        "population, landmarks, founding year and a long description."}]


class TimedMask(GrammarMask):
    """GrammarMask with a stopwatch on its two calls."""

    seconds = 0.0
    calls = 0

    def apply(self, c, history):
        t0 = time.perf_counter()
        try:
            return super().apply(c, history)
        finally:
            TimedMask.seconds += time.perf_counter() - t0

    def accept(self, token):
        t0 = time.perf_counter()
        super().accept(token)
        TimedMask.seconds += time.perf_counter() - t0
        TimedMask.calls += 1


def llamba_rate(llm: Llama, n: int, repeats: int, schema: dict | None, decoding: str = "greedy") -> tuple[float, int]:
    """Median generated tokens per second (and the token count) over repeats, after a warm-up call."""
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}} if schema else None
    rates, tokens = [], 0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(MESSAGES, max_tokens=n, temperature=0, response_format=response_format,
                                         decoding=decoding)
        elapsed = time.perf_counter() - t0
        tokens = out["usage"]["completion_tokens"]
        if i:  # the first call evaluates the prompt; later ones find it in the cache
            rates.append(tokens / elapsed)
    return statistics.median(rates), tokens


def llama_cpp_rate(model_path: str, n: int, repeats: int, schema: dict | None, threads: int) -> tuple[float, int]:
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(model_path, n_ctx=2048, n_threads=threads, verbose=False)
    response_format = {"type": "json_object", "schema": schema} if schema else None
    rates, tokens = [], 0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = llm.create_chat_completion(MESSAGES, max_tokens=n, temperature=0, response_format=response_format)
        elapsed = time.perf_counter() - t0
        tokens = out["usage"]["completion_tokens"]
        if i:
            rates.append(tokens / elapsed)
    return statistics.median(rates), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b")
    parser.add_argument("-n", type=int, default=96, help="tokens to generate")
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    args = parser.parse_args()
    path = str(resolve_model(args.model))
    import llamba.api

    llamba.api.GrammarMask = TimedMask  # the API builds its masks through this name
    llm = Llama(path, n_ctx=2048, n_threads=args.threads)
    print(f"{args.model}, {args.threads} threads, greedy, {args.n} tokens at most, median of {args.repeats}\n")
    print(f"| {'run':<38} | tokens | tok/s | vs llamba free |")
    print(f"| {'-' * 38} | -----: | ----: | -------------: |", flush=True)
    free, n_free = llamba_rate(llm, args.n, args.repeats, None)

    def row(name: str, rate: float, tokens: int) -> None:  # printed as measured: a long run shows its progress
        print(f"| {name:<38} | {tokens:>6} | {rate:5.1f} | {rate / free:13.2f}x |", flush=True)

    row("llamba free", free, n_free)
    TimedMask.seconds, TimedMask.calls = 0.0, 0
    row("llamba json_schema", *llamba_rate(llm, args.n, args.repeats, SCHEMA))
    mask_ms = 1000 * TimedMask.seconds / max(TimedMask.calls, 1)
    row("llamba json_schema, --decoding auto", *llamba_rate(llm, args.n, args.repeats, SCHEMA, decoding="auto"))
    step_ms = 1000 / free
    print(f"\nmask cost: {mask_ms:.2f} ms per token = {100 * mask_ms / step_ms:.1f}% of a free decode step "
          f"({step_ms:.1f} ms)\n", flush=True)
    if not args.no_llama_cpp:
        del llm
        row("llama-cpp-python free", *llama_cpp_rate(path, args.n, args.repeats, None, args.threads))
        row("llama-cpp-python json_schema (GBNF)", *llama_cpp_rate(path, args.n, args.repeats, SCHEMA, args.threads))


if __name__ == "__main__":
    main()
