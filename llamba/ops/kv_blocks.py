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

from .jit import exact_kernel, f16_bits_to_f32, f32_to_f16_bits, kernel

BLOCK = 32
BLOCK_BYTES = {"q8_0": 2 + BLOCK, "q4_0": 2 + BLOCK // 2}
ROW_DTYPE = {"q8_0": np.int8, "q4_0": np.uint8}


def row_bytes(kv_type: str, head_dim: int) -> int:
    """Bytes of one head's vector in a quantized cell."""
    return head_dim // BLOCK * BLOCK_BYTES[kv_type]


# ---------------------------------------------------------------------------------------------- one block
# Stubs whose implementation Numba picks by the row's dtype (int8: q8_0, uint8: q4_0).

def block_dot(row, b, x, d0):
    """x[d0 : d0 + 32] . (block b of row, decoded)"""


def block_add(acc, row, b, w, d0):
    """acc[d0 : d0 + 32] += w * (block b of row, decoded)"""


def block_store(row, b, x, d0):
    """block b of row = x[d0 : d0 + 32] quantized as ggml's reference quantizer does it."""


@exact_kernel(inline=True)
def _scale(row, o):
    """The f16 scale at byte o (two bytes, little-endian; `& 0xFF` reads an int8 byte as unsigned)."""
    return f16_bits_to_f32(np.uint16((row[o] & 0xFF) | ((row[o + 1] & 0xFF) << 8)))


@exact_kernel(inline=True)
def _put_scale(row, o, d):
    bits = f32_to_f16_bits(d)
    row[o] = bits & 0xFF
    row[o + 1] = bits >> 8


def _is_q8(row) -> bool:
    return isinstance(row, types.Array) and row.dtype == types.int8


@overload(block_dot, inline="always")
def _block_dot(row, b, x, d0):
    if _is_q8(row):
        def q8(row, b, x, d0):
            o = b * 34 + 2
            s = np.float32(0.0)
            for i in range(32):
                s += x[d0 + i] * np.float32(row[o + i])
            return s * _scale(row, o - 2)
        return q8

    def q4(row, b, x, d0):
        o = b * 18 + 2
        s = np.float32(0.0)
        for i in range(16):
            byte = np.int32(row[o + i])
            s += x[d0 + i] * np.float32((byte & 15) - 8) + x[d0 + 16 + i] * np.float32((byte >> 4) - 8)
        return s * _scale(row, o - 2)
    return q4


@overload(block_add, inline="always")
def _block_add(acc, row, b, w, d0):
    if _is_q8(row):
        def q8(acc, row, b, w, d0):
            o = b * 34 + 2
            ws = w * _scale(row, o - 2)
            for i in range(32):
                acc[d0 + i] += ws * np.float32(row[o + i])
        return q8

    def q4(acc, row, b, w, d0):
        o = b * 18 + 2
        ws = w * _scale(row, o - 2)
        for i in range(16):
            byte = np.int32(row[o + i])
            acc[d0 + i] += ws * np.float32((byte & 15) - 8)
            acc[d0 + 16 + i] += ws * np.float32((byte >> 4) - 8)
    return q4


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
    x = np.empty(head_dim, np.float32)
    for h in range(out.shape[0]):
        for j in range(cells.size):
            x[:] = 0
            for b in range(head_dim // BLOCK):
                block_add(x, rows[h, cells[j]], b, np.float32(1.0), b * BLOCK)
            for d in range(head_dim):
                out[h, j, d] = x[d] * spread[h, d] + centre[h, d]
