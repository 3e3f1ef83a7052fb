"""Attention of new queries over the KV cache: grouped heads, visibility lists, sliding windows, soft-capping.

Each query comes with the list of cells it sees, in position order (see `memory/kv_cache.py`). Small batches
(decoding, verifying guesses, several sequences) run one Numba kernel over any cache format, parallel over
(KV head, span of cells, query) as flash-decoding splits a deep cache; a query's arithmetic depends only on
its own list, so it is the same alone or in any batch. Long prompts run blocks of
queries per head through matmul's register-blocked float loop: scores = Q K^T over the keys the block can see,
masked, softmaxed, times V, in parallel over blocks and heads.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import kernel, softmax_exp
from .kv_blocks import decode_row
from .matmul import chunk_times_x
from .repack import CHUNK

QUERY_BLOCK = 32  # prefill queries per block: a block skips the keys none of its queries can see
SPAN = 256  # cached cells per decoding job: fixed, never from the thread count (a result must not depend on it)


@kernel(parallel=True)
def attention_listed(out, q, k_rows, v_rows, k_centre, k_spread, visible, counts, cell_pos, q_pos, scale, window,
                     softcap):
    """out [n_tokens, n_head, head_dim] from q [n_tokens, n_head, head_dim] and the cached rows [n_head_kv, n_cells,
    ...] of one layer: float32, float16 bits (uint16) or blocks (kv_blocks.py), read in place.

    Query t sees cells visible[t, :counts[t]] (in position order); with window > 0 only those with
    q_pos - pos < window (llama.cpp's standard sliding window). softcap > 0 applies cap * tanh(score / cap).
    Keys were stored as (k - k_centre) / k_spread per channel (zeros and ones for float caches), so a score is
    q . k_centre plus the dot of q * k_spread with the stored key: the same score, from codes that spend their
    levels on what varies.

    Split as flash-decoding: a job is one KV head's query heads over one span of SPAN of a query's visible
    cells (each row decoded once, for all the heads that share it: the whole cache is read once per token);
    each leaves its span's largest score, sum of exponentials and weighted values, merged span by span in
    order (a serial step: a few thousand operations a layer). Spans are counted from the query's own list, so its arithmetic is the same alone or in any
    batch, and at any thread count: threads change which jobs run where, never what a job computes."""
    n_tokens, n_head, head_dim = q.shape
    n_kv = k_rows.shape[0]
    group = n_head // n_kv
    first, n_spans = np.empty(n_tokens, np.int64), np.empty(n_tokens, np.int64)
    for t in range(n_tokens):
        first[t] = _first_in_window(visible, counts, cell_pos, q_pos, t, window)
        n_spans[t] = (counts[t] - first[t] + SPAN - 1) // SPAN
    most = max(1, n_spans.max())
    best = np.empty((n_tokens, n_kv, most, group), np.float32)
    total = np.empty((n_tokens, n_kv, most, group), np.float32)
    mixed = np.empty((n_tokens, n_kv, most, group, head_dim), np.float32)
    # a KV head's jobs side by side, its spans then its tokens: the static split gives each thread whole heads
    # (or runs of spans), whose rows it reads once for all the batch's queries
    for job in numba.prange(n_kv * most * n_tokens):
        kv, span, t = job // (most * n_tokens), job // n_tokens % most, job % n_tokens
        if span < n_spans[t]:
            j0 = first[t] + span * SPAN
            _attend_span(mixed[t, kv, span], best[t, kv, span], total[t, kv, span], q[t], kv * group, k_rows[kv],
                         v_rows[kv], visible[t, j0 : min(counts[t], j0 + SPAN)], k_centre[kv], k_spread[kv], scale,
                         softcap)
    for t in range(n_tokens):
        for h in range(n_head):
            _merge_spans(out[t, h], mixed[t, h // group], best[t, h // group], total[t, h // group], h % group,
                         n_spans[t])


@kernel(inline=True)
def _attend_span(mixed, best, total, q, h0, k_rows, v_rows, cells, k_centre, k_spread, scale, softcap):
    """For the query heads q[h0 : h0 + group] sharing one KV head, over the given cells: best [group] the
    largest score, total [group] the sum of exp(score - best), mixed [group, head_dim] the values weighted by
    those exponentials."""
    group, head_dim = mixed.shape
    n = cells.size
    spread_q = np.empty((group, head_dim), np.float32)
    centred = np.empty(group, np.float32)
    for g in range(group):
        c = np.float32(0.0)
        for d in range(head_dim):
            spread_q[g, d] = q[h0 + g, d] * k_spread[d]
            c += q[h0 + g, d] * k_centre[d]
        centred[g] = c
    scores = np.empty((group, n), np.float32)
    best[:] = -np.inf
    rows = np.empty((4, head_dim), np.float32)  # decoded once, read for every head of the group
    for j in range(0, n, 4):  # four key rows a pass: four independent sums per head, which overlap
        for i in range(4):  # past the last row: the last again, its scores not kept
            decode_row(rows, i, k_rows, cells[min(j + i, n - 1)])
        for g in range(group):
            s0, s1, s2, s3 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for d in range(head_dim):
                s0 += spread_q[g, d] * rows[0, d]
                s1 += spread_q[g, d] * rows[1, d]
                s2 += spread_q[g, d] * rows[2, d]
                s3 += spread_q[g, d] * rows[3, d]
            for i, s in enumerate((s0, s1, s2, s3)):
                if j + i < n:
                    scores[g, j + i] = _capped((centred[g] + s) * scale, softcap)
                    # here, not in a loop of its own: a max over floats does not vectorize
                    best[g] = max(best[g], scores[g, j + i])
    for g in range(group):
        total[g] = _exponentials(scores[g], best[g])
    mixed[:] = 0
    for j in range(0, n, 4):  # four value rows a pass: one load and store of the accumulator for four rows
        m = min(4, n - j)
        for i in range(m):
            decode_row(rows, i, v_rows, cells[j + i])
        for i in range(m, 4):  # past the last: weight 0 on a row of zeros
            rows[i, :] = 0
        for g in range(group):
            w0, w1 = scores[g, j], scores[g, j + 1] if m > 1 else np.float32(0.0)
            w2, w3 = scores[g, j + 2] if m > 2 else np.float32(0.0), scores[g, j + 3] if m > 3 else np.float32(0.0)
            for d in range(head_dim):
                mixed[g, d] += (w0 * rows[0, d] + w1 * rows[1, d]) + (w2 * rows[2, d] + w3 * rows[3, d])


@kernel(inline=True)
def _exponentials(scores, top):
    """scores <- exp(scores - top), top their largest; returns the sum of the exponentials."""
    total = np.float32(0.0)
    for j in range(scores.size):
        scores[j] = softmax_exp(scores[j] - top)
        total += scores[j]
    return total


@kernel(inline=True)
def _merge_spans(out, mixed, best, total, g, n_spans):
    """out = head g's softmax-weighted values over all spans, from each span's (mixed, best, total), in order."""
    top = -np.inf
    for s in range(n_spans):
        top = max(top, best[s, g])
    weight = np.float32(0.0)
    out[:] = 0
    for s in range(n_spans):
        w = softmax_exp(best[s, g] - top)
        weight += w * total[s, g]
        for d in range(out.size):
            out[d] += w * mixed[s, g, d]
    inverse = np.float32(1.0) / weight
    for d in range(out.size):
        out[d] *= inverse


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
