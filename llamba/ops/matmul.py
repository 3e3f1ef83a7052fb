"""Quantized matrix-vector (decode) and matrix-matrix (prefill) products over lanes-layout weights.

Decode: each thread takes a chunk of output rows and keeps one float accumulator per row; for every input
block it unpacks the codes of all rows in the chunk side by side (one SIMD lane per row) and multiplies by the
broadcast input value. Per block, the sum is scaled and the offset term added with the block's input sum:
sum_k (s*q_k + o) x_k = s * sum_k q_k x_k + o * sum_k x_k.

Prefill: tiles of the weights are dequantized to float32 and multiplied with BLAS through NumPy, which beats
any hand loop once a few tokens share each weight tile.
"""

from __future__ import annotations

import numba
import numpy as np

from .jit import as_f32, kernel, run_split
from .repack import CHUNK, LaneMatrix

_SIXTEEN, _SIXTEENTH = np.float32(16.0), np.float32(1.0 / 16.0)
TILE_BYTES = 1 << 20  # float32 weight tile dequantized for prefill (1 MiB: L2-sized, measured best)


@kernel
def _block_sums(x, group):
    n_blocks = x.shape[0] // group
    sums = np.empty(n_blocks, np.float32)
    for b in range(n_blocks):
        s = np.float32(0.0)
        for j in range(group):
            s += x[b * group + j]
        sums[b] = s
    return sums


@kernel
def _store(out, c, acc):
    """Write a chunk's accumulators to out, leaving out the padding rows past the end."""
    lo = c * CHUNK
    n = min(CHUNK, out.shape[0] - lo)
    for i in range(n):
        out[lo + i] = acc[i]


@kernel
def _add_block(acc, part, scale, offset, c, b, x_block_sum, has_offset):
    """acc += scale * part + offset * (sum of the block's inputs), for one block of one chunk."""
    s = scale[c, b]
    for i in range(CHUNK):
        acc[i] += as_f32(s[i]) * part[i]
    if has_offset:
        o = offset[c, b]
        for i in range(CHUNK):
            acc[i] += as_f32(o[i]) * x_block_sum


@kernel(parallel=True)
def matvec_u4(out, codes, scale, offset, x):
    """out[r] = sum_c W[r, c] x[c] for 4-bit lanes weights (codes [n_chunks, n_blocks, 16, CHUNK])."""
    n_chunks, n_blocks = codes.shape[0], codes.shape[1]
    has_offset = offset.shape[1] > 0  # types without mins store no offsets
    xsum = _block_sums(x, 32)
    for c in numba.prange(n_chunks):
        acc = np.zeros(CHUNK, np.float32)
        part = np.empty(CHUNK, np.float32)
        for b in range(n_blocks):
            part[:] = 0.0
            for j in range(16):
                x_lo, x_hi = x[b * 32 + j], x[b * 32 + 16 + j]
                q = codes[c, b, j]
                for i in range(CHUNK):
                    # Nibbles split in float (exact for 0..255): integer & and >> get widened to 64-bit lanes
                    # by Numba's typing, which halves the vector width; this runs ~20% faster.
                    both = np.float32(q[i])
                    high = np.floor(both * _SIXTEENTH)
                    part[i] += (both - high * _SIXTEEN) * x_lo + high * x_hi
            _add_block(acc, part, scale, offset, c, b, xsum[b], has_offset)
        _store(out, c, acc)


@kernel(parallel=True)
def matvec_q8(out, codes, scale, offset, x):
    """out = W x for one-code-per-byte lanes weights (codes [n_chunks, n_blocks, group, CHUNK], int8/uint8)."""
    n_chunks, n_blocks, group = codes.shape[0], codes.shape[1], codes.shape[2]
    has_offset = offset.shape[1] > 0
    xsum = _block_sums(x, group)
    for c in numba.prange(n_chunks):
        acc = np.zeros(CHUNK, np.float32)
        part = np.empty(CHUNK, np.float32)
        for b in range(n_blocks):
            part[:] = 0.0
            for j in range(group):
                xv = x[b * group + j]
                q = codes[c, b, j]
                for i in range(CHUNK):
                    part[i] += np.float32(q[i]) * xv
            _add_block(acc, part, scale, offset, c, b, xsum[b], has_offset)
        _store(out, c, acc)


@kernel(parallel=True)
def matvec_f32(out, w, x):
    """out = W x for float lanes weights (w [n_chunks, n_cols, CHUNK])."""
    n_chunks, n_cols = w.shape[0], w.shape[1]
    for c in numba.prange(n_chunks):
        acc = np.zeros(CHUNK, np.float32)
        for k in range(n_cols):
            xv = x[k]
            wk = w[c, k]
            for i in range(CHUNK):
                acc[i] += wk[i] * xv
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
def dequant_tile_u4(tile, codes, scale, offset, c0):
    """tile[k, r] = W[c0*CHUNK + r, k] for 4-bit lanes weights (tile [n_cols, n_tile_chunks*CHUNK])."""
    n_blocks = codes.shape[1]
    for t in range(tile.shape[1] // CHUNK):
        c, at = c0 + t, t * CHUNK
        for b in range(n_blocks):
            s, o = _block_scales(scale, offset, c, b)
            for j in range(16):
                q = codes[c, b, j]
                lo_row, hi_row = tile[b * 32 + j, at : at + CHUNK], tile[b * 32 + 16 + j, at : at + CHUNK]
                for i in range(CHUNK):
                    both = np.float32(q[i])  # nibbles split in float, as in matvec_u4
                    high = np.floor(both * _SIXTEENTH)
                    lo_row[i] = s[i] * (both - high * _SIXTEEN) + o[i]
                    hi_row[i] = s[i] * high + o[i]


@kernel
def dequant_tile_q8(tile, codes, scale, offset, c0):
    """tile[k, r] = W[c0*CHUNK + r, k] for one-code-per-byte lanes weights."""
    n_blocks, group = codes.shape[1], codes.shape[2]
    for t in range(tile.shape[1] // CHUNK):
        c, at = c0 + t, t * CHUNK
        for b in range(n_blocks):
            s, o = _block_scales(scale, offset, c, b)
            for j in range(group):
                q = codes[c, b, j]
                row = tile[b * group + j, at : at + CHUNK]
                for i in range(CHUNK):
                    row[i] = s[i] * np.float32(q[i]) + o[i]


@kernel
def dequant_tile_f32(tile, w, c0):
    n_cols = w.shape[1]
    for t in range(tile.shape[1] // CHUNK):
        for k in range(n_cols):
            tile[k, t * CHUNK : (t + 1) * CHUNK] = w[c0 + t, k]


def matvec(out: np.ndarray, w: LaneMatrix, x: np.ndarray) -> np.ndarray:
    """out [n_rows] = W x for x [n_cols] float32 (C-contiguous); returns out."""
    if w.kind == "u4":
        matvec_u4(out, w.codes, w.scale, w.offset, x)
    elif w.kind == "q8":
        matvec_q8(out, w.codes, w.scale, w.offset, x)
    else:
        matvec_f32(out, w.codes, x)
    return out


def dequant_tile(tile: np.ndarray, w: LaneMatrix, c0: int) -> None:
    """Fill tile [n_cols, k*CHUNK] with the float weights of chunks c0 .. c0+k, transposed."""
    if w.kind == "u4":
        dequant_tile_u4(tile, w.codes, w.scale, w.offset, c0)
    elif w.kind == "q8":
        dequant_tile_q8(tile, w.codes, w.scale, w.offset, c0)
    else:
        dequant_tile_f32(tile, w.codes, c0)


def matmul(x: np.ndarray, w: LaneMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """[n_tokens, n_cols] -> [n_tokens, n_rows]: the decode kernel for a token or two, else float tiles + BLAS.

    For tiles, each of the kernel threads takes a share of the weight chunks and runs dequantize + BLAS on
    it (BLAS itself single-threaded): BLAS's own threads and Numba's would otherwise spin against each other.
    """
    n_tokens = x.shape[0]
    if out is None:
        out = np.empty((n_tokens, w.n_rows), np.float32)
    if n_tokens <= 2:
        for t in range(n_tokens):
            matvec(out[t], w, x[t])
        return out
    run_split(lambda first, stop: _tiles_times_x(x, w, out, first, stop), w.codes.shape[0])
    return out


def _tiles_times_x(x: np.ndarray, w: LaneMatrix, out: np.ndarray, first: int, stop: int) -> None:
    """out[:, rows of chunks first..stop] = x @ W[those rows].T, one float tile of chunks at a time."""
    tile_chunks = max(1, TILE_BYTES // (4 * w.n_cols * CHUNK))
    for c0 in range(first, stop, tile_chunks):
        k = min(tile_chunks, stop - c0)
        tile = np.empty((w.n_cols, k * CHUNK), np.float32)
        dequant_tile(tile, w, c0)
        r0 = c0 * CHUNK
        n = min(k * CHUNK, w.n_rows - r0)
        out[:, r0 : r0 + n] = (x @ tile)[:, :n]


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
