"""Mixture-of-experts routing: each token's router scores -> the experts it uses and their weights.

One token at a time in a fixed order, so a token's experts and weights depend on its scores alone, never on
the batch around it (the experts' products then are batch invariant too, and so are the logits).
"""

from __future__ import annotations

import numpy as np

from .jit import exact_kernel, softmax_exp

_ONE = np.float32(1.0)


def route_top_k(scores: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """scores [n_tokens, n_expert] (the router's logits) -> expert ids [n_tokens, k] int64, best first, and
    their weights [n_tokens, k] float32: the softmax over all experts of the chosen ones, rescaled to sum to
    one if `normalize` (Mixtral, Qwen3-MoE), as they are otherwise (Qwen2-MoE)."""
    n_tokens, n_expert = scores.shape
    ids = np.empty((n_tokens, k), np.int64)
    weights = np.empty((n_tokens, k), np.float32)
    _route_top_k(ids, weights, np.ascontiguousarray(scores, dtype=np.float32), normalize)
    return ids, weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) elementwise, each element alone (the shared expert's gate)."""
    out = np.empty(x.shape, np.float32)
    _sigmoid(out.reshape(-1), np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return out


@exact_kernel(ieee_division=True)
def _route_top_k(ids, weights, scores, normalize):
    n_tokens, n_expert = scores.shape
    k = ids.shape[1]
    probs = np.empty(n_expert, np.float32)
    for t in range(n_tokens):
        row = scores[t]
        top = row[0]
        for e in range(1, n_expert):
            top = max(top, row[e])
        total = np.float32(0.0)
        for e in range(n_expert):
            probs[e] = softmax_exp(row[e] - top)
            total += probs[e]
        chosen_sum = np.float32(0.0)
        for slot in range(k):  # selection, best first; ties go to the lower id
            best = -1
            for e in range(n_expert):
                if probs[e] >= 0 and (best < 0 or probs[e] > probs[best]):
                    best = e
            if best < 0:  # NaN scores: any expert will do, the NaN weight stops the model after the layer
                best = slot
            ids[t, slot] = best
            weights[t, slot] = probs[best] / total
            chosen_sum += weights[t, slot]
            probs[best] = -1.0  # taken
        if normalize:
            for slot in range(k):
                weights[t, slot] = weights[t, slot] / chosen_sum


@exact_kernel(ieee_division=True)
def _sigmoid(out, x):
    for i in range(x.size):
        e = softmax_exp(-abs(x[i]))  # exp(-|x|) <= 1: no overflow either side
        out[i] = (_ONE if x[i] >= 0 else e) / (_ONE + e)
