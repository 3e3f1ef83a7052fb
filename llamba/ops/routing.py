"""Mixture-of-experts routing: each token's router scores -> the experts it uses and their weights.

One token at a time in a fixed order, so a token's experts and weights depend on its scores alone, never on
the batch around it (the experts' products then are batch invariant too, and so are the logits). As
llama.cpp routes: gate the scores (softmax over the experts, or a sigmoid each: DeepSeek-V3), add the
selection bias if there is one (exp_probs_b: it steers which experts win, not how much they weigh), keep
the best groups of experts if the model limits them (each group scored by its two best), take the top k
and their gated scores as weights, rescaled to sum to one if asked.
"""

from __future__ import annotations

import numpy as np

from .jit import exact_kernel, softmax_exp

_ONE = np.float32(1.0)
_TAKEN = np.float32(-np.inf)  # a choice already made, or an expert outside the groups kept
NO_BIAS = np.zeros(0, np.float32)


def route_top_k(scores: np.ndarray, k: int, normalize: bool, sigmoid_gate: bool = False, bias: np.ndarray = NO_BIAS,
                n_group: int = 1, group_used: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scores [n_tokens, n_expert] (the router's logits) -> expert ids [n_tokens, k] int64, best first, and
    their weights [n_tokens, k] float32 (see the module's docstring). The caller checks that k experts fit
    in group_used of the n_group groups."""
    n_tokens, n_expert = scores.shape
    ids = np.empty((n_tokens, k), np.int64)
    weights = np.empty((n_tokens, k), np.float32)
    _route(ids, weights, np.ascontiguousarray(scores, dtype=np.float32), bias, sigmoid_gate, n_group, group_used,
           normalize)
    return ids, weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) elementwise, each element alone (the shared expert's gate)."""
    out = np.empty(x.shape, np.float32)
    _sigmoid(out.reshape(-1), np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return out


@exact_kernel(ieee_division=True)
def _route(ids, weights, scores, bias, sigmoid_gate, n_group, group_used, normalize):
    n_tokens, n_expert = scores.shape
    k = ids.shape[1]
    probs = np.empty(n_expert, np.float32)
    choice = np.empty(n_expert, np.float32)
    for t in range(n_tokens):
        _gate(probs, scores[t], sigmoid_gate)
        for e in range(n_expert):
            choice[e] = probs[e] + bias[e] if bias.size > 0 else probs[e]
        if group_used < n_group:
            _keep_best_groups(choice, n_group, group_used)
        chosen_sum = np.float32(0.0)
        for slot in range(k):  # selection, best first; ties go to the lower id
            best = _best(choice)
            if best < 0:  # NaN scores: any expert will do, the NaN weight stops the model after the layer
                best = slot
            ids[t, slot] = best
            weights[t, slot] = probs[best]
            chosen_sum += probs[best]
            choice[best] = _TAKEN
        if normalize:
            for slot in range(k):
                weights[t, slot] = weights[t, slot] / chosen_sum


@exact_kernel(inline=True, ieee_division=True)
def _gate(probs, row, sigmoid_gate):
    """probs [n_expert]: the softmax of the router's row, or each score's sigmoid."""
    n_expert = row.shape[0]
    if sigmoid_gate:
        for e in range(n_expert):
            probs[e] = _sigmoid_one(row[e])
        return
    top = row[0]
    for e in range(1, n_expert):
        top = max(top, row[e])
    total = np.float32(0.0)
    for e in range(n_expert):
        probs[e] = softmax_exp(row[e] - top)
        total += probs[e]
    for e in range(n_expert):
        probs[e] = probs[e] / total


@exact_kernel(inline=True)
def _best(choice):
    """The index of the largest choice still open (-1 if none: all taken, or NaN)."""
    best = -1
    for e in range(choice.shape[0]):
        if choice[e] > _TAKEN and (best < 0 or choice[e] > choice[best]):
            best = e
    return best


@exact_kernel(inline=True)
def _keep_best_groups(choice, n_group, group_used):
    """Close every expert outside the group_used groups whose two best choices sum highest."""
    per_group = choice.shape[0] // n_group
    group_score = np.empty(n_group, np.float32)
    for g in range(n_group):
        first, second = _TAKEN, _TAKEN
        for e in range(g * per_group, (g + 1) * per_group):
            if choice[e] > first:
                first, second = choice[e], first
            elif choice[e] > second:
                second = choice[e]
        group_score[g] = first + second
    kept = np.zeros(n_group, np.bool_)
    for _ in range(group_used):
        best = _best(group_score)
        if best < 0:
            break
        kept[best] = True
        group_score[best] = _TAKEN
    for g in range(n_group):
        if not kept[g]:
            for e in range(g * per_group, (g + 1) * per_group):
                choice[e] = _TAKEN


@exact_kernel(ieee_division=True)
def _sigmoid(out, x):
    for i in range(x.size):
        out[i] = _sigmoid_one(x[i])


@exact_kernel(inline=True, ieee_division=True)
def _sigmoid_one(x):
    e = softmax_exp(-abs(x))  # exp(-|x|) <= 1: no overflow either side
    return (_ONE if x >= 0 else e) / (_ONE + e)
