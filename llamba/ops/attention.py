"""Attention of new queries over the KV cache: grouped heads, visibility lists, sliding windows, soft-capping.

Each query comes with the list of cells it sees, in position order (see `runtime/kv_cache.py`). Small batches
(decoding, verifying guesses, several sequences) run one Numba kernel, parallel over (query, head); a query's
arithmetic depends only on its own list, so it is the same alone or in any batch. Long prompts run blocks of
queries through BLAS per KV head: scores = Q K^T over the keys the block can see, masked, softmaxed, times V.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, kernel, softmax_exp

QUERY_BLOCK = 32  # prefill queries per BLAS call: a block skips the keys none of its queries can see


@kernel(parallel=True)
def attention_listed(out, q, k_cache, v_cache, visible, counts, cell_pos, q_pos, scale, window, softcap):
    """out [n_tokens, n_head, head_dim] from q [n_tokens, n_head, head_dim] and caches [n_head_kv, n_cells,
    head_dim] (float32, or float16 bits as uint16).

    Query t sees cells visible[t, :counts[t]] (in position order); with window > 0 only those with
    q_pos - pos < window (llama.cpp's standard sliding window). softcap > 0 applies cap * tanh(score / cap).
    """
    n_tokens, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[0]
    for job in numba.prange(n_tokens * n_head):
        t, h = job // n_head, job % n_head
        kv = h // group
        n = counts[t]
        first = 0
        if window > 0:
            while first < n and q_pos[t] - cell_pos[visible[t, first]] >= window:
                first += 1
        n_keys = n - first
        scores = np.empty(n_keys, np.float32)
        best = -np.inf
        for j in range(n_keys):
            key = k_cache[kv, visible[t, first + j]]
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
            scores[j] = softmax_exp(scores[j] - best)
            total += scores[j]
        acc = np.zeros(head_dim, np.float32)
        for j in range(n_keys):
            p = scores[j] / total
            value = v_cache[kv, visible[t, first + j]]
            for d in range(head_dim):
                acc[d] += p * as_f32(value[d])
        out[t, h, :] = acc


def attention_chain(out, q, k_cache, v_cache, keys: np.ndarray, key_pos: np.ndarray, q_pos: np.ndarray,
                    scale, window: int, softcap) -> np.ndarray:
    """Long prompts: queries that each see the cells `keys` (in position order) up to their own position.

    keys [n_keys] are the sequence's cached cells followed by the batch's own; key_pos their positions."""
    contiguous = len(keys) and keys[-1] - keys[0] + 1 == len(keys) and (np.diff(keys) == 1).all()
    if contiguous:  # a view, no copy: the usual case of one conversation
        k_rows, v_rows = k_cache[:, keys[0] : keys[-1] + 1], v_cache[:, keys[0] : keys[-1] + 1]
    else:
        k_rows, v_rows = k_cache[:, keys], v_cache[:, keys]
    for t0 in range(0, q.shape[0], QUERY_BLOCK):
        t1 = min(q.shape[0], t0 + QUERY_BLOCK)
        _attend_block(out, q, k_rows, v_rows, key_pos, q_pos, t0, t1, scale, window, softcap)
    return out


def _attend_block(out, q, k_rows, v_rows, key_pos, q_pos, t0: int, t1: int, scale, window: int, softcap) -> None:
    """Queries t0..t1 through BLAS, per KV head, over only the keys some query of the block sees."""
    n_kv = k_rows.shape[0]
    group = q.shape[1] // n_kv
    qp = q_pos[t0:t1, None]
    lo = int(np.searchsorted(key_pos, q_pos[t0] - window + 1)) if window > 0 else 0
    hi = int(np.searchsorted(key_pos, q_pos[t1 - 1], side="right"))
    kp = key_pos[None, lo:hi]
    hidden = kp > qp
    if window > 0:
        hidden |= qp - kp >= window
    for kv in range(n_kv):
        queries = q[t0:t1, kv * group : (kv + 1) * group].transpose(1, 0, 2)  # [group, block, head_dim]
        scores = queries @ _floats(k_rows[kv, lo:hi]).T  # [group, block, n_keys]
        scores *= np.float32(scale)
        if softcap > 0:
            scores /= np.float32(softcap)
            np.tanh(scores, out=scores)
            scores *= np.float32(softcap)
        scores[:, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out[t0:t1, kv * group : (kv + 1) * group] = (scores @ _floats(v_rows[kv, lo:hi])).transpose(1, 0, 2)


def _floats(cached: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a float16 cache holds its values as uint16 bits)."""
    return cached.view(np.float16).astype(np.float32) if cached.dtype == np.uint16 else cached
