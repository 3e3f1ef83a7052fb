"""Block-quantized KV rows: a cell's vector for one head as ggml blocks of 32 values, written once by the cache
and read block by block by attention (never widened as a whole).

q8_0: an f16 scale and 32 int8 codes (34 bytes a block); q4_0: an f16 scale and 32 4-bit codes, value j of a
block in the low nibble of byte j and value 16 + j in its high nibble (18 bytes). Both are ggml's layouts and
ggml's reference rounding, so `formats.quants` reads and writes the same bytes. A q8_0 row is stored as int8
and a q4_0 row as uint8: the dtype tells the kernels which format they hold, so each kernel compiles once per
format and nothing branches on the type inside a loop.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .jit import as_f32, exact_kernel, f16_bits_to_f32, f32_to_f16_bits, kernel

BLOCK = 32
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}
ROW_DTYPE = {"q8_0": np.int8, "q4_0": np.uint8}


def row_bytes(kv_type: str, head_dim: int) -> int:
    """Bytes of one head's vector in a quantized cell."""
    return head_dim // BLOCK * BLOCK_BYTES[kv_type]


# ---------------------------------------------------------------------------------------------- one block

def block_store(row, b, x, d0):
    """block b of row = x[d0 : d0 + 32] quantized as ggml's reference quantizer does it (picked by the row's
    dtype: int8 q8_0, uint8 q4_0)."""


@exact_kernel(inline=True)
def _scale(rows, r, o):
    """Row r's f16 scale at byte o (two bytes, little-endian; `& 0xFF` reads an int8 byte as unsigned)."""
    return f16_bits_to_f32(np.uint16((rows[r, o] & 0xFF) | ((rows[r, o + 1] & 0xFF) << 8)))


@exact_kernel(inline=True)
def _put_scale(row, o, d):
    bits = f32_to_f16_bits(d)
    row[o] = bits & 0xFF
    row[o + 1] = bits >> 8


def _is_q8(row) -> bool:
    return isinstance(row, types.Array) and row.dtype == types.int8


@overload(block_store, inline="always")
def _block_store(row, b, x, d0):
    if _is_q8(row):
        def q8(row, b, x, d0):  # ggml's quantize_row_q8_0_ref: codes round(x / d), half away from zero
            top = np.float32(0.0)
            for i in range(32):
                top = max(top, abs(x[d0 + i]))
            d = top / np.float32(127.0)
            inverse = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            o = b * 34
            _put_scale(row, o, d)
            for i in range(32):
                v = x[d0 + i] * inverse
                row[o + 2 + i] = np.int8(np.floor(v + np.float32(0.5)) if v >= 0 else -np.floor(-v + np.float32(0.5)))
        return q8

    def q4(row, b, x, d0):  # ggml's quantize_row_q4_0_ref: d = (the value of largest magnitude) / -8
        top, signed = np.float32(0.0), np.float32(0.0)
        for i in range(32):
            if abs(x[d0 + i]) > top:
                top, signed = abs(x[d0 + i]), x[d0 + i]
        d = signed / np.float32(-8.0)
        inverse = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        o = b * 18
        _put_scale(row, o, d)
        for i in range(16):
            lo = min(15, np.int32(x[d0 + i] * inverse + np.float32(8.5)))
            hi = min(15, np.int32(x[d0 + 16 + i] * inverse + np.float32(8.5)))
            row[o + 2 + i] = np.uint8(lo | (hi << 4))
    return q4


# ---------------------------------------------------------------------------------------------- one row

def decode_row(out, k, rows, r):
    """out[k] = rows[r] as float32, whatever the cache's format: float32, float16 bits (uint16), or the blocks
    above. Numba picks the implementation by the dtype. Attention decodes a row once and then reads floats
    for every head that shares it: a dot product per block costs a horizontal sum per block per head, which
    made a q8_0 score ten times the cost of a float one."""


@overload(decode_row, inline="always")
def _decode_row(out, k, rows, r):
    if rows.dtype in (types.float32, types.uint16):
        def floats(out, k, rows, r):
            for d in range(out.shape[1]):
                out[k, d] = as_f32(rows[r, d])
        return floats
    # The loops over a block run to a count LLVM cannot see (n, which is 32): a constant count has the loop
    # unrolled before the vectorizer sees it, and the unrolled conversions stay scalar (four times slower).
    if _is_q8(rows):
        def q8(out, k, rows, r):
            n_blocks = out.shape[1] // BLOCK
            n = out.shape[1] // n_blocks
            for b in range(n_blocks):
                o, d0 = b * 34, b * n
                scale = _scale(rows, r, o)
                for i in range(n):
                    out[k, d0 + i] = scale * np.float32(rows[r, o + 2 + i])
        return q8

    def q4(out, k, rows, r):
        n_blocks = out.shape[1] // BLOCK
        n = out.shape[1] // n_blocks // 2
        for b in range(n_blocks):
            o, d0 = b * 18, b * 2 * n
            scale = _scale(rows, r, o)
            for i in range(n):
                byte = np.int32(rows[r, o + 2 + i])
                out[k, d0 + i] = scale * np.float32((byte & 15) - 8)
                out[k, d0 + n + i] = scale * np.float32((byte >> 4) - 8)
    return q4


# ---------------------------------------------------------------------------------------------- whole rows

@exact_kernel
def store_cells(rows, cells, src, centre, inverse_spread):
    """rows[h, cells[t]] = (src[t, h] - centre[h]) * inverse_spread[h], quantized ([n_head_kv, n_cells, row
    bytes] <- [n_tokens, n_head_kv, head_dim]; centre, inverse_spread [n_head_kv, head_dim]). A token's bytes
    depend on its own vector alone."""
    head_dim = src.shape[2]
    x = np.empty(head_dim, np.float32)
    for t in range(src.shape[0]):
        for h in range(src.shape[1]):
            for d in range(head_dim):
                x[d] = (src[t, h, d] - centre[h, d]) * inverse_spread[h, d]
            row = rows[h, cells[t]]
            for b in range(head_dim // BLOCK):
                block_store(row, b, x, b * BLOCK)


@kernel
def decode_cells(out, rows, cells, centre, spread):
    """out[h, j] = rows[h, cells[j]] decoded * spread[h] + centre[h] ([n_head_kv, n_cells, head_dim] float32):
    the keys or values a long prompt's queries see, widened once for all of them."""
    head_dim = out.shape[2]
    x = np.empty((1, head_dim), np.float32)
    for h in range(out.shape[0]):
        for j in range(cells.size):
            decode_row(x, 0, rows[h], cells[j])
            for d in range(head_dim):
                out[h, j, d] = x[0, d] * spread[h, d] + centre[h, d]
