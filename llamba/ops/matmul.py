"""Quantized matrix products over lanes-layout weights: batch kernels (1..64 tokens) and prefill.

Batch (decoding, verifying guesses, several sequences): each thread takes a chunk of output rows and keeps one
float accumulator per row and token; for every input block it unpacks the codes of all rows in the chunk side
by side (one SIMD lane per row), once for all the tokens, and multiplies by each token's broadcast inputs. Per
block, the sum is scaled and the offset term added with the block's input sum:
sum_k (s*q_k + o) x_k = s * sum_k q_k x_k + o * sum_k x_k. A lane's arithmetic is fixed by the source (no
reassociation), so a token's outputs are bit-identical whatever else is in the batch.

Prefill: each thread dequantizes a chunk's rows to float32 and multiplies them with all the tokens in a
register-blocked loop (8 tokens x 2 rows per pass). It beats BLAS on the same float tiles: no tile round trip
through memory, no Python between tiles, and it is compiled for this CPU's vector width, which a BLAS
pinned to older kernels (OPENBLAS_CORETYPE) is not.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, exact_kernel, fma, kernel
from .repack import CHUNK, LaneMatrix

_SIXTEEN, _SIXTEENTH = np.float32(16.0), np.float32(1.0 / 16.0)
SMALL_BATCH = 64  # up to this many tokens, the batch-invariant kernels


@exact_kernel
def _block_sums(x, group):
    """[n_tokens, n_blocks]: each block's input sum (for the offset term)."""
    n_blocks = x.shape[1] // group
    sums = np.empty((x.shape[0], n_blocks), np.float32)
    for t in range(x.shape[0]):
        for b in range(n_blocks):
            s = np.float32(0.0)
            for j in range(group):
                s += x[t, b * group + j]
            sums[t, b] = s
    return sums


@exact_kernel
def _store(out, c, acc):
    """Write a chunk's accumulators [n_tokens, CHUNK] to out, leaving out the padding rows past the end."""
    lo = c * CHUNK
    n = min(CHUNK, out.shape[1] - lo)
    for t in range(out.shape[0]):
        for i in range(n):
            out[t, lo + i] = acc[t, i]


@exact_kernel
def _add_block(acc, part, scale, offset, c, b, xsum):
    """acc[t] += scale * (part[0, t] + part[1, t]) + offset * (token t's block input sum), for one block of one
    chunk. The block's products go to two partial sums in turn: two dependency chains, each half as long."""
    s = scale[c, b]
    for t in range(acc.shape[0]):
        a, p, q = acc[t], part[0, t], part[1, t]
        for i in range(CHUNK):
            a[i] = fma(as_f32(s[i]), p[i] + q[i], a[i])
    if offset.shape[1] > 0:  # types without mins store no offsets
        o = offset[c, b]
        for t in range(acc.shape[0]):
            a, xs = acc[t], xsum[t, b]
            for i in range(CHUNK):
                a[i] = fma(as_f32(o[i]), xs, a[i])


@exact_kernel
def _fma4(p, w, xa, xb, xc, xd):
    """p += w[0] xa + w[1] xb + w[2] xc + w[3] xd over the chunk's lanes: one token's share of 4 unpacked inputs."""
    for i in range(CHUNK):
        p[i] = fma(w[3, i], xd, fma(w[2, i], xc, fma(w[1, i], xb, fma(w[0, i], xa, p[i]))))


@exact_kernel(inline=True)
def _tokens_times_w(part, w, x, t, ca, cb, cc, cd):
    """part[t:] += w[0] x[:, ca] + w[1] x[:, cb] + w[2] x[:, cc] + w[3] x[:, cd], four tokens per pass (each
    unpacked weight loaded once for four, sixteen independent FMA chains in flight), then one at a time.
    Every token gets the same fma sequence either way."""
    n = part.shape[0]
    while t + 4 <= n:
        pa, pb, pc, pd = part[t], part[t + 1], part[t + 2], part[t + 3]
        a0, a1, a2, a3 = x[t, ca], x[t, cb], x[t, cc], x[t, cd]
        b0, b1, b2, b3 = x[t + 1, ca], x[t + 1, cb], x[t + 1, cc], x[t + 1, cd]
        c0, c1, c2, c3 = x[t + 2, ca], x[t + 2, cb], x[t + 2, cc], x[t + 2, cd]
        d0, d1, d2, d3 = x[t + 3, ca], x[t + 3, cb], x[t + 3, cc], x[t + 3, cd]
        for i in range(CHUNK):
            w0, w1, w2, w3 = w[0, i], w[1, i], w[2, i], w[3, i]
            pa[i] = fma(w3, a3, fma(w2, a2, fma(w1, a1, fma(w0, a0, pa[i]))))
            pb[i] = fma(w3, b3, fma(w2, b2, fma(w1, b1, fma(w0, b0, pb[i]))))
            pc[i] = fma(w3, c3, fma(w2, c2, fma(w1, c1, fma(w0, c0, pc[i]))))
            pd[i] = fma(w3, d3, fma(w2, d2, fma(w1, d1, fma(w0, d0, pd[i]))))
        t += 4
    for t in range(t, n):
        _fma4(part[t], w, x[t, ca], x[t, cb], x[t, cc], x[t, cd])


@exact_kernel(parallel=True)
def batch_u4(out, codes, scale, offset, x):
    """out [n_tokens, n_rows] = x W^T for 4-bit lanes weights (codes [n_chunks, n_blocks, 16, CHUNK]).

    Each weight is read once for all the tokens. Token 0's products are fused into the unpacking pass (so a
    single token costs what a plain matrix-vector product does); the others reuse the unpacked floats.
    """
    n_tokens = x.shape[0]
    n_chunks, n_blocks = codes.shape[0], codes.shape[1]
    xsum = _block_sums(x, 32)
    for c in numba.prange(n_chunks):
        acc = np.zeros((n_tokens, CHUNK), np.float32)
        part = np.empty((2, n_tokens, CHUNK), np.float32)
        w = np.empty((4, CHUNK), np.float32)
        for b in range(n_blocks):
            part[:] = 0.0
            for j in range(0, 16, 2):  # two code bytes per pass: part is loaded and stored once per 4 FMAs
                half = part[(j // 2) % 2]
                p0 = half[0]
                at = b * 32 + j
                xa, xb, xc, xd = x[0, at], x[0, at + 16], x[0, at + 1], x[0, at + 17]
                q0, q1 = codes[c, b, j], codes[c, b, j + 1]
                for i in range(CHUNK):
                    # Nibbles split in float (exact for 0..255): integer & and >> get widened to 64-bit lanes
                    # by Numba's typing, which halves the vector width; this runs ~20% faster.
                    both0, both1 = np.float32(q0[i]), np.float32(q1[i])
                    high0, high1 = np.floor(both0 * _SIXTEENTH), np.floor(both1 * _SIXTEENTH)
                    w0, w2 = both0 - high0 * _SIXTEEN, both1 - high1 * _SIXTEEN
                    w[0, i], w[1, i], w[2, i], w[3, i] = w0, high0, w2, high1
                    p0[i] = fma(high1, xd, fma(w2, xc, fma(high0, xb, fma(w0, xa, p0[i]))))
                _tokens_times_w(half, w, x, 1, at, at + 16, at + 1, at + 17)
            _add_block(acc, part, scale, offset, c, b, xsum)
        _store(out, c, acc)


@exact_kernel(parallel=True)
def batch_q8(out, codes, scale, offset, x):
    """out [n_tokens, n_rows] = x W^T for one-code-per-byte lanes weights (codes [n_chunks, n_blocks, group,
    CHUNK], int8/uint8), four inputs per pass, token 0 fused into the unpacking as in batch_u4."""
    n_tokens = x.shape[0]
    n_chunks, n_blocks, group = codes.shape[0], codes.shape[1], codes.shape[2]
    xsum = _block_sums(x, group)
    for c in numba.prange(n_chunks):
        acc = np.zeros((n_tokens, CHUNK), np.float32)
        part = np.empty((2, n_tokens, CHUNK), np.float32)
        w = np.empty((4, CHUNK), np.float32)
        for b in range(n_blocks):
            part[:] = 0.0
            for j in range(0, group, 4):
                half = part[(j // 4) % 2]
                p0 = half[0]
                at = b * group + j
                xa, xb, xc, xd = x[0, at], x[0, at + 1], x[0, at + 2], x[0, at + 3]
                qa, qb, qc, qd = codes[c, b, j], codes[c, b, j + 1], codes[c, b, j + 2], codes[c, b, j + 3]
                for i in range(CHUNK):
                    wa, wb, wc, wd = np.float32(qa[i]), np.float32(qb[i]), np.float32(qc[i]), np.float32(qd[i])
                    w[0, i], w[1, i], w[2, i], w[3, i] = wa, wb, wc, wd
                    p0[i] = fma(wd, xd, fma(wc, xc, fma(wb, xb, fma(wa, xa, p0[i]))))
                _tokens_times_w(half, w, x, 1, at, at + 1, at + 2, at + 3)
            _add_block(acc, part, scale, offset, c, b, xsum)
        _store(out, c, acc)


@exact_kernel(parallel=True)
def batch_f32(out, w, x):
    """out [n_tokens, n_rows] = x W^T for float lanes weights (w [n_chunks, n_cols, CHUNK]), four inputs per pass."""
    n_tokens = x.shape[0]
    n_chunks, n_cols = w.shape[0], w.shape[1]
    for c in numba.prange(n_chunks):
        acc = np.zeros((n_tokens, CHUNK), np.float32)
        wc = w[c]
        k = 0
        while k + 4 <= n_cols:
            _tokens_times_w(acc, wc[k : k + 4], x, 0, k, k + 1, k + 2, k + 3)
            k += 4
        for k in range(k, n_cols):  # fewer than four left (n_cols not a multiple of 4)
            for t in range(n_tokens):
                a, xv, wk = acc[t], x[t, k], wc[k]
                for i in range(CHUNK):
                    a[i] = fma(wk[i], xv, a[i])
        _store(out, c, acc)


@kernel
def _block_scales(scale, offset, c, b):
    """A block's scales and offsets for one chunk as float32 arrays (zeros where a type has no offsets)."""
    s = np.empty(CHUNK, np.float32)
    o = np.zeros(CHUNK, np.float32)
    for i in range(CHUNK):
        s[i] = as_f32(scale[c, b, i])
    if offset.shape[1] > 0:
        for i in range(CHUNK):
            o[i] = as_f32(offset[c, b, i])
    return s, o


@kernel
def dequant_chunk_u4(tile, codes, scale, offset, c):
    """tile[k, r] = W[c*CHUNK + r, k] for 4-bit lanes weights (tile [n_cols, CHUNK])."""
    for b in range(codes.shape[1]):
        s, o = _block_scales(scale, offset, c, b)
        for j in range(16):
            q = codes[c, b, j]
            lo_row, hi_row = tile[b * 32 + j], tile[b * 32 + 16 + j]
            for i in range(CHUNK):
                both = np.float32(q[i])  # nibbles split in float, as in batch_u4
                high = np.floor(both * _SIXTEENTH)
                lo_row[i] = s[i] * (both - high * _SIXTEEN) + o[i]
                hi_row[i] = s[i] * high + o[i]


@kernel
def dequant_chunk_q8(tile, codes, scale, offset, c):
    """tile[k, r] = W[c*CHUNK + r, k] for one-code-per-byte lanes weights (tile [n_cols, CHUNK])."""
    group = codes.shape[2]
    for b in range(codes.shape[1]):
        s, o = _block_scales(scale, offset, c, b)
        for j in range(group):
            q = codes[c, b, j]
            row = tile[b * group + j]
            for i in range(CHUNK):
                row[i] = s[i] * np.float32(q[i]) + o[i]


def matvec(out: np.ndarray, w: LaneMatrix, x: np.ndarray) -> np.ndarray:
    """out [n_rows] = W x for x [n_cols] float32: the one-token case of the batch kernels."""
    matmul(x.reshape(1, -1), w, out=out.reshape(1, -1))
    return out


def _batch_product(out: np.ndarray, w: LaneMatrix, x: np.ndarray) -> None:
    if w.kind == "u4":
        batch_u4(out, w.codes, w.scale, w.offset, x)
    elif w.kind == "q8":
        batch_q8(out, w.codes, w.scale, w.offset, x)
    else:
        batch_f32(out, w.codes, x)


# ------------------------------------------------------------------------------------- prefill

K_BLOCK = 512  # inputs per pass of the register-blocked loop: 8 token rows of it stay in L1


@numba.njit(inline="always", cache=True)
def _add_column(acc, t, r, s0, s1, s2, s3, s4, s5, s6, s7):
    """acc[t .. t+8, r] += the eight sums (no temporary array in the hot loop)."""
    acc[t, r] += s0
    acc[t + 1, r] += s1
    acc[t + 2, r] += s2
    acc[t + 3, r] += s3
    acc[t + 4, r] += s4
    acc[t + 5, r] += s5
    acc[t + 6, r] += s6
    acc[t + 7, r] += s7


@kernel
def _chunk_times_x(out, x, w, r0):
    """out[t, r0 + r] = x[t] . w[r] for one chunk's float rows w [CHUNK, n_cols] (rows past out's end skipped).

    Register blocking: 8 tokens x 2 rows of scalar sums, written out, which LLVM keeps in 16 vector registers
    (an accumulator array would go through memory). Each loaded input then feeds two FMAs and each weight
    eight, so the loop runs at FMA speed instead of load speed. The inputs go in K blocks that keep the 8
    token rows in L1.
    """
    n_tokens, n_cols = x.shape
    n_kb = (n_cols + K_BLOCK - 1) // K_BLOCK
    step = ((n_cols + n_kb - 1) // n_kb + 15) // 16 * 16  # even blocks, whole vectors
    acc = np.zeros((n_tokens, CHUNK), np.float32)
    for k0 in range(0, n_cols, step):
        width = min(n_cols, k0 + step) - k0
        t = 0
        while t + 8 <= n_tokens:
            for r in range(0, CHUNK, 2):
                s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
                s40 = s41 = s50 = s51 = s60 = s61 = s70 = s71 = np.float32(0.0)
                for kk in range(width):
                    k = np.uint64(k0 + kk)  # unsigned: no negative-index wrap-around, which would stop SIMD
                    b0, b1 = w[r, k], w[r + 1, k]
                    a = x[t, k]
                    s00 += a * b0
                    s01 += a * b1
                    a = x[t + 1, k]
                    s10 += a * b0
                    s11 += a * b1
                    a = x[t + 2, k]
                    s20 += a * b0
                    s21 += a * b1
                    a = x[t + 3, k]
                    s30 += a * b0
                    s31 += a * b1
                    a = x[t + 4, k]
                    s40 += a * b0
                    s41 += a * b1
                    a = x[t + 5, k]
                    s50 += a * b0
                    s51 += a * b1
                    a = x[t + 6, k]
                    s60 += a * b0
                    s61 += a * b1
                    a = x[t + 7, k]
                    s70 += a * b0
                    s71 += a * b1
                _add_column(acc, t, r, s00, s10, s20, s30, s40, s50, s60, s70)
                _add_column(acc, t, r + 1, s01, s11, s21, s31, s41, s51, s61, s71)
            t += 8
        for t in range(t, n_tokens):  # the last few tokens, one at a time
            for r in range(CHUNK):
                s = np.float32(0.0)
                for kk in range(width):
                    k = np.uint64(k0 + kk)
                    s += x[t, k] * w[r, k]
                acc[t, r] += s
    n = min(CHUNK, out.shape[1] - r0)
    for t in range(n_tokens):  # a loop, not a slice assignment: Numba's broadcast-error path compiles for 8 s
        for r in range(n):
            out[t, r0 + r] = acc[t, r]


@kernel(parallel=True)
def matmul_u4(out, x, codes, scale, offset):
    """out = x @ W.T for 4-bit lanes weights: each thread dequantizes a chunk's rows, then multiplies."""
    for c in numba.prange(codes.shape[0]):
        tile = np.empty((x.shape[1], CHUNK), np.float32)
        dequant_chunk_u4(tile, codes, scale, offset, c)
        _chunk_times_x(out, x, np.ascontiguousarray(tile.T), c * CHUNK)


@kernel(parallel=True)
def matmul_q8(out, x, codes, scale, offset):
    for c in numba.prange(codes.shape[0]):
        tile = np.empty((x.shape[1], CHUNK), np.float32)
        dequant_chunk_q8(tile, codes, scale, offset, c)
        _chunk_times_x(out, x, np.ascontiguousarray(tile.T), c * CHUNK)


@kernel(parallel=True)
def matmul_f32(out, x, w):
    for c in numba.prange(w.shape[0]):
        _chunk_times_x(out, x, np.ascontiguousarray(w[c].T), c * CHUNK)


def matmul(x: np.ndarray, w: LaneMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """[n_tokens, n_cols] -> [n_tokens, n_rows].

    Up to SMALL_BATCH tokens run the batch kernels, whose arithmetic per token does not depend on how many
    tokens there are (batch invariance: a token's outputs are bit-identical alone or in any such batch).
    More tokens (long prompts) run the prefill kernel: float rows of a chunk at a time times all the tokens.
    """
    n_tokens = x.shape[0]
    if out is None:
        out = np.empty((n_tokens, w.n_rows), np.float32)
    dense = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)  # one kernel variant
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n_tokens <= SMALL_BATCH:
        _batch_product(dense, w, x)
    elif w.kind == "u4":
        matmul_u4(dense, x, w.codes, w.scale, w.offset)
    elif w.kind == "q8":
        matmul_q8(dense, x, w.codes, w.scale, w.offset)
    else:
        matmul_f32(dense, x, w.codes)
    if dense is not out:
        out[...] = dense
    return out


@kernel
def _row_u4(out, codes, scale, offset, r):
    c, i = r // CHUNK, r % CHUNK
    for b in range(codes.shape[1]):
        s = as_f32(scale[c, b, i])
        o = as_f32(offset[c, b, i]) if offset.shape[1] > 0 else np.float32(0.0)
        for j in range(16):
            q = codes[c, b, j, i]
            out[b * 32 + j] = s * np.float32(q & np.uint8(15)) + o
            out[b * 32 + 16 + j] = s * np.float32(q >> np.uint8(4)) + o


@kernel
def _row_q8(out, codes, scale, offset, r):
    c, i = r // CHUNK, r % CHUNK
    group = codes.shape[2]
    for b in range(codes.shape[1]):
        s = as_f32(scale[c, b, i])
        o = as_f32(offset[c, b, i]) if offset.shape[1] > 0 else np.float32(0.0)
        for j in range(group):
            out[b * group + j] = s * np.float32(codes[c, b, j, i]) + o


def gather_rows(w: LaneMatrix, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of W as float32 [len(rows), n_cols]: the embedding lookup."""
    out = np.empty((len(rows), w.n_cols), np.float32) if out is None else out
    for t, r in enumerate(rows):
        r = int(r)
        if w.kind == "u4":
            _row_u4(out[t], w.codes, w.scale, w.offset, r)
        elif w.kind == "q8":
            _row_q8(out[t], w.codes, w.scale, w.offset, r)
        else:
            out[t] = w.codes[r // CHUNK, :, r % CHUNK]
    return out
