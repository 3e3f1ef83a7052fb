"""Attention of new queries over the KV cache: grouped heads, visibility lists, sliding windows, soft-capping.

Each query comes with the list of cells it sees, in position order (see `memory/kv_cache.py`). Small batches
(decoding, verifying guesses, several sequences) run one Numba kernel, parallel over (query, head); a query's
arithmetic depends only on its own list, so it is the same alone or in any batch. Long prompts run blocks of
queries per head through matmul's register-blocked float loop: scores = Q K^T over the keys the block can see,
masked, softmaxed, times V, in parallel over blocks and heads.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, kernel, softmax_exp
from .kv_blocks import BLOCK, block_add, block_dot
from .matmul import chunk_times_x
from .repack import CHUNK

QUERY_BLOCK = 32  # prefill queries per block: a block skips the keys none of its queries can see


@kernel(parallel=True)
def attention_listed(out, q, k_cache, v_cache, visible, counts, cell_pos, q_pos, scale, window, softcap):
    """out [n_tokens, n_head, head_dim] from q [n_tokens, n_head, head_dim] and caches [n_head_kv, n_cells,
    head_dim] (float32, or float16 bits as uint16).

    Query t sees cells visible[t, :counts[t]] (in position order); with window > 0 only those with
    q_pos - pos < window (llama.cpp's standard sliding window). softcap > 0 applies cap * tanh(score / cap).
    """
    n_tokens, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[0]
    # a head's jobs side by side: the static split then gives each thread whole heads, whose cache rows it
    # reads once for all the queries (query-major, two threads each read every head: 1.3x slower at 2 tokens)
    for job in numba.prange(n_tokens * n_head):
        h, t = job // n_tokens, job % n_tokens
        kv = h // group
        first = _first_in_window(visible, counts, cell_pos, q_pos, t, window)
        n_keys = counts[t] - first
        scores = np.empty(n_keys, np.float32)
        for j in range(n_keys):
            key = k_cache[kv, visible[t, first + j]]
            s = np.float32(0.0)
            for d in range(head_dim):
                s += q[t, h, d] * as_f32(key[d])
            scores[j] = _capped(s * scale, softcap)
        _softmax(scores)
        # the values four at a time: one per pass left the loop's overhead (the accumulator's loads and
        # stores, aliasing checks) costing more than its arithmetic
        values, cells = v_cache[kv], visible[t, first:counts[t]]
        acc = np.zeros(head_dim, np.float32)
        j = 0
        while j + 4 <= n_keys:
            v0, v1, v2, v3 = values[cells[j]], values[cells[j + 1]], values[cells[j + 2]], values[cells[j + 3]]
            p0, p1, p2, p3 = scores[j], scores[j + 1], scores[j + 2], scores[j + 3]
            for d in range(head_dim):
                acc[d] += (p0 * as_f32(v0[d]) + p1 * as_f32(v1[d])) + (p2 * as_f32(v2[d]) + p3 * as_f32(v3[d]))
            j += 4
        for j in range(j, n_keys):
            value, p = values[cells[j]], scores[j]
            for d in range(head_dim):
                acc[d] += p * as_f32(value[d])
        out[t, h, :] = acc


@kernel(parallel=True)
def attention_listed_blocks(out, q, k_rows, v_rows, k_centre, k_spread, visible, counts, cell_pos, q_pos, scale,
                            window, softcap):
    """attention_listed over a block-quantized cache (see kv_blocks.py), read block by block in place.

    Keys were stored as (k - k_centre) / k_spread per channel, so a score is q . k_centre plus the dot of
    q * k_spread with the stored key: the same score, from codes that spend their levels on what varies."""
    n_tokens, n_head, head_dim = q.shape
    n_blocks = head_dim // BLOCK
    group = n_head // k_rows.shape[0]
    for job in numba.prange(n_tokens * n_head):
        h, t = job // n_tokens, job % n_tokens
        kv = h // group
        first = _first_in_window(visible, counts, cell_pos, q_pos, t, window)
        n_keys = counts[t] - first
        spread_q = q[t, h] * k_spread[kv]
        centred = np.float32(0.0)
        for d in range(head_dim):
            centred += q[t, h, d] * k_centre[kv, d]
        scores = np.empty(n_keys, np.float32)
        for j in range(n_keys):
            key = k_rows[kv, visible[t, first + j]]
            s = centred
            for b in range(n_blocks):
                s += block_dot(key, b, spread_q, b * BLOCK)
            scores[j] = _capped(s * scale, softcap)
        _softmax(scores)
        acc = np.zeros(head_dim, np.float32)
        for j in range(n_keys):
            value = v_rows[kv, visible[t, first + j]]
            for b in range(n_blocks):
                block_add(acc, value, b, scores[j], b * BLOCK)
        out[t, h, :] = acc


@kernel(inline=True)
def _first_in_window(visible, counts, cell_pos, q_pos, t, window):
    """Index of the first of query t's visible cells inside its sliding window (0 without one)."""
    first = 0
    if window > 0:
        while first < counts[t] and q_pos[t] - cell_pos[visible[t, first]] >= window:
            first += 1
    return first


@kernel(inline=True)
def _capped(s, softcap):
    return softcap * np.tanh(s / softcap) if softcap > 0 else s


@kernel(inline=True)
def _softmax(scores):
    """scores <- softmax(scores), in place."""
    best = -np.inf
    for j in range(scores.size):
        best = max(best, scores[j])
    total = np.float32(0.0)
    for j in range(scores.size):
        scores[j] = softmax_exp(scores[j] - best)
        total += scores[j]
    inverse = np.float32(1.0) / total
    for j in range(scores.size):
        scores[j] *= inverse


def attention_chain(out, q, keys: np.ndarray, values: np.ndarray, key_pos: np.ndarray, q_pos: np.ndarray,
                    scale, window: int, softcap) -> np.ndarray:
    """Long prompts: queries that each see the keys (in position order) up to their own position.

    keys, values [n_head_kv, n_keys, head_dim] float32 are what the batch's sequence sees: its cached cells
    followed by the batch's own, widened from the cache once for all the queries; key_pos their positions.
    They are padded to whole chunks (the values transposed), so that each block of queries is two
    register-blocked products (matmul's prefill loop), in parallel over blocks and heads."""
    n_kv, n_keys, head_dim = keys.shape
    padded_dim = -(-head_dim // CHUNK) * CHUNK
    keys_f = np.zeros((n_kv, n_keys + CHUNK, head_dim), np.float32)
    keys_f[:, :n_keys] = keys
    values_t = np.zeros((n_kv, padded_dim, n_keys), np.float32)
    values_t[:, :head_dim] = values.transpose(0, 2, 1)
    _attend_chain(out, q, keys_f, values_t, key_pos, q_pos, scale, window, softcap)
    return out


@kernel(parallel=True)
def _attend_chain(out, q, keys, values_t, key_pos, q_pos, scale, window, softcap):
    """Per block of QUERY_BLOCK queries and head: scores = Q K^T over the keys some query of the block sees,
    masked and softmaxed by row, then out = P V (as P times the rows of V^T)."""
    n_tokens, n_head, head_dim = q.shape
    group = n_head // keys.shape[0]
    n_blocks = (n_tokens + QUERY_BLOCK - 1) // QUERY_BLOCK
    for job in numba.prange(n_blocks * n_head):
        b, h = job // n_head, job % n_head
        kv = h // group
        t0, t1 = b * QUERY_BLOCK, min(n_tokens, (b + 1) * QUERY_BLOCK)
        lo = np.searchsorted(key_pos, q_pos[t0] - window + 1) if window > 0 else 0
        hi = np.searchsorted(key_pos, q_pos[t1 - 1] + 1)
        queries = np.ascontiguousarray(q[t0:t1, h])
        scores = np.empty((t1 - t0, hi - lo), np.float32)
        for c0 in range(0, hi - lo, CHUNK):
            chunk_times_x(scores, queries, np.ascontiguousarray(keys[kv, lo + c0 : lo + c0 + CHUNK]), c0)
        _softmax_rows(scores, key_pos[lo:hi], q_pos[t0:t1], scale, window, softcap)
        mixed = np.empty((t1 - t0, head_dim), np.float32)
        for d0 in range(0, head_dim, CHUNK):
            chunk_times_x(mixed, scores, np.ascontiguousarray(values_t[kv, d0 : d0 + CHUNK, lo:hi]), d0)
        for t in range(t1 - t0):
            for d in range(head_dim):
                out[t0 + t, h, d] = mixed[t, d]


@kernel
def _softmax_rows(scores, key_pos, q_pos, scale, window, softcap):
    """Each row's softmax over the keys its query sees (position not after its own, within the window);
    the others get 0."""
    for t in range(scores.shape[0]):
        row = scores[t]
        best = -np.inf
        for j in range(row.size):
            seen = key_pos[j] <= q_pos[t] and (window <= 0 or q_pos[t] - key_pos[j] < window)
            s = row[j] * scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            row[j] = s if seen else -np.inf
            best = max(best, row[j])
        total = np.float32(0.0)
        for j in range(row.size):
            row[j] = softmax_exp(row[j] - best) if row[j] > -np.inf else np.float32(0.0)
            total += row[j]
        for j in range(row.size):  # a NaN score leaves no key weighted: NaN out, which stops the model
            row[j] = row[j] / total if total > 0 else np.float32(np.nan)
