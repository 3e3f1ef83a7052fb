"""Attention of new queries over the KV cache: grouped heads, causal and sliding-window masks, soft-capping.

Decoding (a few queries) runs a Numba kernel, parallel over heads. Prefill runs per KV head through BLAS:
scores = Q K^T for all the group's queries at once, masked, softmaxed, times V.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, kernel

PREFILL_QUERIES = 8  # from this many new tokens on, the BLAS path is faster


@kernel(parallel=True)
def attention_decode(out, q, k_cache, v_cache, start_pos, scale, window, softcap):
    """out [n_tokens, n_head, head_dim] from q [n_tokens, n_head, head_dim] and caches [n_head_kv, n_ctx, head_dim]
    (float32, or float16 bits as uint16).

    Query t sits at position start_pos + t and sees keys 0 .. start_pos + t; with window > 0 only the last
    `window` of them (llama.cpp's standard sliding window: key p is hidden when q_pos - p >= window).
    softcap > 0 applies cap * tanh(score / cap) before the softmax.
    """
    n_tokens, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[0]
    for job in numba.prange(n_tokens * n_head):
        t, h = job // n_head, job % n_head
        kv = h // group
        pos = start_pos + t
        first = max(0, pos - window + 1) if window > 0 else 0
        n_keys = pos + 1 - first
        scores = np.empty(n_keys, np.float32)
        best = -np.inf
        for j in range(n_keys):
            key = k_cache[kv, first + j]
            s = np.float32(0.0)
            for d in range(head_dim):
                s += q[t, h, d] * as_f32(key[d])
            s *= scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            scores[j] = s
            best = max(best, s)
        total = np.float32(0.0)
        for j in range(n_keys):
            scores[j] = np.exp(scores[j] - best)
            total += scores[j]
        acc = np.zeros(head_dim, np.float32)
        for j in range(n_keys):
            p = scores[j] / total
            value = v_cache[kv, first + j]
            for d in range(head_dim):
                acc[d] += p * as_f32(value[d])
        out[t, h, :] = acc


def attention(out, q, k_cache, v_cache, start_pos: int, scale, window: int, softcap) -> np.ndarray:
    """out [n_tokens, n_head, head_dim]: see attention_decode for the contract."""
    n_tokens, n_head, head_dim = q.shape
    if n_tokens < PREFILL_QUERIES:
        attention_decode(out, q, k_cache, v_cache, start_pos, scale, window, softcap)
        return out
    n_kv = k_cache.shape[0]
    group = n_head // n_kv
    n_keys = start_pos + n_tokens
    q_pos = np.arange(start_pos, n_keys)[:, None]
    k_pos = np.arange(n_keys)[None, :]
    hidden = k_pos > q_pos
    if window > 0:
        hidden |= q_pos - k_pos >= window
    for kv in range(n_kv):
        queries = q[:, kv * group : (kv + 1) * group].transpose(1, 0, 2)  # [group, n_tokens, head_dim]
        scores = queries @ _floats(k_cache[kv, :n_keys]).T  # [group, n_tokens, n_keys]
        scores *= np.float32(scale)
        if softcap > 0:
            scores /= np.float32(softcap)
            np.tanh(scores, out=scores)
            scores *= np.float32(softcap)
        scores[:, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[:, kv * group : (kv + 1) * group] = (scores @ _floats(v_cache[kv, :n_keys])).transpose(1, 0, 2)
    return out


def _floats(cached: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a float16 cache holds its values as uint16 bits)."""
    return cached.view(np.float16).astype(np.float32) if cached.dtype == np.uint16 else cached
