"""Perplexity as llama.cpp's llama-perplexity computes it: non-overlapping chunks of n_ctx tokens, each
evaluated from an empty cache (its first token replaced by BOS when the model adds one), scoring only the
second half of each chunk, where every prediction has at least n_ctx/2 tokens of context."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import LlambaError


@dataclass
class PerplexityResult:
    ppl: float
    chunks: int
    tokens_scored: int
    per_chunk: list[float]

    @property
    def nll(self) -> float:
        return math.log(self.ppl)


def perplexity(model, tokenizer, cache, text: str, n_ctx: int = 512, max_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    tokens = tokenizer.encode(text, add_special=True)
    n_chunks = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks == 0:
        raise LlambaError(f"the text has {len(tokens)} tokens: at least {n_ctx} are needed for one chunk of -c {n_ctx}")
    if n_ctx > cache.n_ctx:
        raise LlambaError(f"-c {n_ctx} is larger than the cache ({cache.n_ctx})")
    first = n_ctx // 2
    total_nll, scored, per_chunk = 0.0, 0, []
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            chunk[0] = tokenizer.bos_id
        cache.trim(0)
        logits = model.forward_tokens(chunk, 0, cache, all_logits=True, logits_from=first)  # [n_ctx - first, n_vocab]
        targets = np.asarray(chunk[first + 1 :])
        nll = _negative_log_likelihoods(logits[:-1], targets)
        total_nll += float(nll.sum())
        scored += len(targets)
        per_chunk.append(math.exp(total_nll / scored))
        if progress:
            progress(c + 1, n_chunks, per_chunk[-1])
    return PerplexityResult(math.exp(total_nll / scored), n_chunks, scored, per_chunk)


def _negative_log_likelihoods(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64 as llama.cpp accumulates."""
    rows = logits.astype(np.float64)
    top = rows.max(axis=1)
    log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    return log_norm - rows[np.arange(len(targets)), targets]
