"""Speed measurement in the manner of llama-bench: prompt processing (pp N) and generation (tg N) in
tokens per second, repeated, with llama-cpp-python on the same file and threads measured interleaved."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import LlambaError
from .formats.ggml_types import ggml_type
from .memory.kv_cache import QUANTIZED


@dataclass
class Measurement:
    engine: str
    test: str  # "pp128", "tg64"
    n_tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.mean(self.rates)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.rates) if len(self.rates) > 1 else 0.0


class LlambaRunner:
    def __init__(self, llm):
        self.model = llm.model
        self.cache = llm.model.new_cache(1024, llm.cache.kv_type)

    def prompt(self, ids: list[int]) -> None:
        self.cache.trim(0)
        self.model.forward_tokens(ids, 0, self.cache)

    def generate(self, ids: list[int]) -> None:
        self.cache.trim(0)
        for pos, token in enumerate(ids):
            self.model.forward_tokens([token], pos, self.cache)


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, n_ctx: int = 1024, kv_type: str = "f16"):
        try:
            from llama_cpp import Llama as LlamaCpp
        except ImportError:
            raise LlambaError("--compare-llama-cpp needs llama-cpp-python: pip install 'llamba[bench]'") from None
        kv = ggml_type(kv_type).id  # llama.cpp's quantized values need flash attention
        self.llm = LlamaCpp(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                            verbose=False, logits_all=False, type_k=kv, type_v=kv, flash_attn=kv_type in QUANTIZED)

    def prompt(self, ids: list[int]) -> None:
        self.llm.reset()  # n_past back to 0: eval overwrites the cache from the start
        self.llm.eval(ids)

    def generate(self, ids: list[int]) -> None:
        self.llm.reset()
        for token in ids:
            self.llm.eval([token])


def run_bench(runners: dict[str, object], n_vocab: int, n_prompt: int, n_gen: int, repetitions: int,
              progress: Callable[[str], None] | None = None) -> list[Measurement]:
    """Warm each runner once, then alternate engines within every repetition (same noise for both)."""
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(100, n_vocab, n_prompt).tolist()
    gen_ids = rng.integers(100, n_vocab, n_gen).tolist()
    results = []
    for test, n, action, ids in (("pp", n_prompt, "prompt", prompt_ids), ("tg", n_gen, "generate", gen_ids)):
        if n <= 0:
            continue
        per_engine = {name: Measurement(name, f"{test}{n}", n) for name in runners}
        for runner in runners.values():
            getattr(runner, action)(ids[: min(8, n)])  # warm-up
        for rep in range(repetitions):
            for name, runner in runners.items():
                started = time.perf_counter()
                getattr(runner, action)(ids)
                per_engine[name].seconds.append(time.perf_counter() - started)
                if progress:
                    progress(f"{test}{n} {name} rep {rep + 1}/{repetitions}: {n / per_engine[name].seconds[-1]:.1f} t/s")
        results.extend(per_engine.values())
    return results


def markdown_table(model_name: str, threads: int, results: list[Measurement]) -> str:
    tests = sorted({m.test for m in results}, key=lambda t: (t[:2] != "pp", t))
    by = {(m.engine, m.test): m for m in results}
    compare = any(m.engine == "llama.cpp" for m in results)
    head = "| model | threads | test | llamba t/s |" + (" llama.cpp t/s | ratio |" if compare else "")
    rule = "| --- | ---: | --- | ---: |" + (" ---: | ---: |" if compare else "")
    lines = [head, rule]
    for test in tests:
        ours = by[("llamba", test)]
        row = f"| {model_name} | {threads} | {test} | {ours.mean:.1f} ± {ours.stdev:.1f} |"
        if compare:
            theirs = by[("llama.cpp", test)]
            row += f" {theirs.mean:.1f} ± {theirs.stdev:.1f} | {ours.mean / theirs.mean:.2f} |"
        lines.append(row)
    return "\n".join(lines)
