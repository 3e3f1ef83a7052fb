"""Attention of new queries over the KV cache: grouped heads, causal and sliding-window masks, soft-capping.

Decoding (a few queries) runs a Numba kernel, parallel over heads. Prefill runs blocks of queries, per KV head,
through BLAS: scores = Q K^T for all the group's queries at once, masked, softmaxed, times V.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, kernel

PREFILL_QUERIES = 8  # from this many new tokens on, the BLAS path is faster
QUERY_BLOCK = 32  # prefill queries per BLAS call: a block skips the keys none of its queries can see


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
    n_tokens = q.shape[0]
    if n_tokens < PREFILL_QUERIES:
        attention_decode(out, q, k_cache, v_cache, start_pos, scale, window, softcap)
        return out
    for t0 in range(0, n_tokens, QUERY_BLOCK):
        t1 = min(n_tokens, t0 + QUERY_BLOCK)
        _attend_block(out, q, k_cache, v_cache, start_pos, t0, t1, scale, window, softcap)
    return out


def _attend_block(out, q, k_cache, v_cache, start_pos: int, t0: int, t1: int, scale, window: int, softcap) -> None:
    """Queries t0..t1 through BLAS, per KV head: scores = Q K^T over only the keys some query of the block
    sees (causal: none after its last position; sliding window: none before its first query's window)."""
    n_kv = k_cache.shape[0]
    group = q.shape[1] // n_kv
    q_pos = np.arange(start_pos + t0, start_pos + t1)[:, None]
    first_key = max(0, start_pos + t0 - window + 1) if window > 0 else 0
    k_pos = np.arange(first_key, start_pos + t1)[None, :]
    hidden = k_pos > q_pos
    if window > 0:
        hidden |= q_pos - k_pos >= window
    keys = slice(first_key, start_pos + t1)
    for kv in range(n_kv):
        queries = q[t0:t1, kv * group : (kv + 1) * group].transpose(1, 0, 2)  # [group, block, head_dim]
        scores = queries @ _floats(k_cache[kv, keys]).T  # [group, block, n_keys]
        scores *= np.float32(scale)
        if softcap > 0:
            scores /= np.float32(softcap)
            np.tanh(scores, out=scores)
            scores *= np.float32(softcap)
        scores[:, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[t0:t1, kv * group : (kv + 1) * group] = (scores @ _floats(v_cache[kv, keys])).transpose(1, 0, 2)


def _floats(cached: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a float16 cache holds its values as uint16 bits)."""
    return cached.view(np.float16).astype(np.float32) if cached.dtype == np.uint16 else cached
