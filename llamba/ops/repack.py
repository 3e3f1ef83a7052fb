"""Repack GGML blocks into the lanes layout the matrix kernels vectorize over.

GGML stores a weight matrix row by row, each row a run of blocks. A matrix-vector product over that layout
needs a horizontal sum per block, which Numba does not vectorize. The lanes layout transposes it within chunks
of CHUNK output rows: for each block of the input dimension, the codes of the chunk's rows sit side by side, so
the kernels' inner loops run over rows, one SIMD lane per row, with no horizontal sums. Each chunk is one
contiguous run of memory, read front to back, which the prefetchers love. Every block type becomes one of:

- `u4`: 4-bit codes, 32 per block, byte j holding codes j (low nibble) and j+16 (high nibble);
                                                                                  (Q4_0, Q4_1, Q4_K)
- `u5`: 5-bit codes, 32 per block: the nibbles as u4, then 4 bytes of top bits (see _put_u5_tops);
                                                                                  (Q5_0, Q5_1, Q5_K)
- `u6`: 6-bit codes, 16 per block in 12 bytes: byte j < 12 holds code j in bits 0-5 and bits 2p, 2p + 1 of
  code 12 + j % 4 (p = j // 4) in bits 6-7, so 12 codes are a mask away and the last 4 take three shifts
  (the fewest operations per code we found: nibbles plus a quad of top bits took twice as many); (Q6_K)
- `q8`: one code per byte, `group` (16 or 32) per block;                           (Q8_0, Q2_K, Q3_K)
- `f32`: plain floats, codes [n_chunks, n_cols, CHUNK] float32.                    (F32, F16, BF16)

The code bytes of a block go in quads, the integer dot product's unit (see int8_dot): codes
[n_chunks, n_blocks, n_quads, CHUNK, 4] uint8, quad q holding code bytes 4q..4q+3 of every row side by side.
Codes are unsigned: signed types store code + code_bias, which the kernels take back out exactly.
Weight = scale * (code - code_bias) + offset, per block and row. Where a type's scales are float16 numbers
(Q4_0..Q8_0), scale and offset [n_chunks, n_blocks, CHUNK] hold their bits (uint16). The K-quants keep what
the file keeps: per super-block of 256 weights and row the float16 d (and dmin) in `supers`
[n_chunks, n_super, 1 or 2, CHUNK], per block the small integer sub-block scale (and min) in scale and offset
(uint8, or int8 where signed); the kernels form scale = d * sc and offset = -(dmin * mn) in float32, exactly
(products of an 11-bit and an 8-bit integer), as ggml does. So dequantizing the lanes gives ggml's values bit
for bit, and every type takes the file's bytes (Q4_K/Q5_K 4 more per 256 weights and row: their 6-bit scales
unpacked to bytes). Rows past n_rows in the last chunk are zero.
The layout is built once at load, in parallel.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, NamedTuple

import numba
import numpy as np

from ..errors import LlambaError, UnsupportedError
from ..formats.ggml_types import GGMLType
from ..formats.quants import dequantize
from .jit import kernel, readonly

CHUNK = 32  # output rows per chunk: the lanes a kernel's inner loop runs over


@dataclass
class LaneMatrix:
    """A weight matrix [n_rows, n_cols] (y = W x maps n_cols inputs to n_rows outputs) in lanes layout."""

    kind: str  # "u4", "u5", "u6", "q8" or "f32"
    n_rows: int
    n_cols: int
    codes: np.ndarray
    scale: np.ndarray  # [n_chunks, n_blocks, CHUNK]: float16 bits (uint16), or sub-block scales (uint8, int8)
    offset: np.ndarray  # like scale; [n_chunks, 0, CHUNK] for types without offsets
    supers: np.ndarray  # [n_chunks, n_super, 1 or 2, CHUNK] uint16: the K-quants' d (and dmin); else n_super 0
    source_type: str
    code_bias: int = 0  # subtracted from every stored code: the type's codes are signed

    @property
    def nibbles(self) -> bool:
        """Codes packed two to a byte (u4, and u5 with its quad of top bits)."""
        return self.kind in ("u4", "u5")

    @property
    def group(self) -> int:
        """Weights per block."""
        return 1 if self.kind == "f32" else _GROUPS.get(self.kind, 4 * self.codes.shape[2])

    @cached_property
    def int8_operands(self) -> tuple:
        """The integer kernel's weight arguments, (codes, scale, offset, supers, code_bias, group, input_span,
        layout), worked out once: decoding calls it over a hundred times per token."""
        return (self.codes, self.scale, self.offset, self.supers, self.code_bias, self.group, self.input_span,
                LAYOUTS.index(self.layout))

    @property
    def input_span(self) -> int:
        """Inputs that share one activation scale: a K-quant's super-block (its sub-blocks' integer scales
        then apply to integer sums), else a block."""
        return SUPER if self.supers.shape[1] else self.group

    @property
    def layout(self) -> str:
        return _layout_name(self.kind, self.group)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.offset.nbytes + self.supers.nbytes


def leading_rows(w: LaneMatrix, n: int) -> LaneMatrix:
    """The matrix's first n rows (rounded up to whole chunks), a view of the same memory: every array's first
    axis is the chunk of rows."""
    chunks = min(-(-n // CHUNK), w.codes.shape[0])
    return replace(w, n_rows=min(w.n_rows, chunks * CHUNK), codes=w.codes[:chunks], scale=w.scale[:chunks],
                   offset=w.offset[:chunks], supers=w.supers[:chunks])


LAYOUTS = ("u4", "u5", "u6", "q8_32", "q8_16")  # the integer kernel's code layouts, by index (int8_dot's table)
U4, U5, U6, Q8_32, Q8_16 = range(len(LAYOUTS))
_GROUPS = {"u4": 32, "u5": 32, "u6": 16}  # weights per block; q8 has 4 per quad


def _layout_name(kind: str, group: int) -> str:
    """The kernel layout: the kind, and for q8 its group."""
    return f"q8_{group}" if kind == "q8" else kind


# ------------------------------------------------------------------------------------- block decoders
# Each decodes row r of src straight into the lanes arrays (quads, scales, offsets), parallel over rows:
# one pass over the file's bytes and one write of each lanes byte, which is most of loading a model.

@kernel
def _f16_bits(src, r, at):
    """The file's float16 at byte `at` of row r, as its bits (the scales the lanes keep as float16)."""
    return np.uint16(src[r, at]) | (np.uint16(src[r, at + 1]) << 8)


@kernel
def _put(quads, c, b, j, i, code):
    """Code byte j of row i of chunk c's block b, in quad layout."""
    quads[c, b, j >> 2, i, j & 3] = code


@kernel
def _u32(src, r, at):
    """A little-endian uint32 at byte `at` of row r (the high bits of Q5_0 / Q5_1)."""
    return (np.uint32(src[r, at]) | (np.uint32(src[r, at + 1]) << 8)
            | (np.uint32(src[r, at + 2]) << 16) | (np.uint32(src[r, at + 3]) << 24))


@kernel
def _put_u5_tops(quads, c, b, i, tops):
    """The top bits of a u5 block's 32 codes (bit l of `tops` for code l) as its code bytes 16..19: byte m
    holds bit 2q for code 4q + m and bit 2q + 1 for code 4q + m + 16 (q = 0..3)."""
    for m in range(4):
        byte = np.uint32(0)
        for q in range(4):
            byte |= ((tops >> (4 * q + m)) & 1) << (2 * q)
            byte |= ((tops >> (4 * q + m + 16)) & 1) << (2 * q + 1)
        _put(quads, c, b, 16 + m, i, np.uint8(byte))


@kernel(parallel=True)
def _repack_q4_0(quads, scale, offset, supers, src):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 18
            scale[c, b, i] = _f16_bits(src, r, at)  # weight d * (code - 8): the code bias, no offset
            for j in range(16):
                _put(quads, c, b, j, i, src[r, at + 2 + j])


@kernel(parallel=True)
def _repack_q4_1(quads, scale, offset, supers, src):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 20
            scale[c, b, i] = _f16_bits(src, r, at)
            offset[c, b, i] = _f16_bits(src, r, at + 2)
            for j in range(16):
                _put(quads, c, b, j, i, src[r, at + 4 + j])


@kernel
def _k_super_block(scale, offset, supers, src, r, c, i, at, sb):
    """A Q4_K/Q5_K super-block's d, dmin (its first 4 bytes) and 8 sub-block scales and mins (the next 12)."""
    supers[c, sb, 0, i] = _f16_bits(src, r, at)
    supers[c, sb, 1, i] = _f16_bits(src, r, at + 2)
    for s in range(8):
        scale[c, sb * 8 + s, i], offset[c, sb * 8 + s, i] = _k_scale_min(src, r, at + 4, s)


@kernel
def _k_scale_min(src, r, at, s):
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block s from the 12 bytes at `at`."""
    if s < 4:
        return src[r, at + s] & 63, src[r, at + s + 4] & 63
    sc = (src[r, at + s + 4] & 0x0F) | ((src[r, at + s - 4] >> 6) << 4)
    mn = (src[r, at + s + 4] >> 4) | ((src[r, at + s] >> 6) << 4)
    return sc, mn


@kernel
def _put_k_nibbles(quads, src, r, c, b, i, base, shift):
    """A Q4_K/Q5_K sub-block's low nibbles (codes 0..31 from bytes base.., at `shift`) as u4 bytes."""
    for j in range(16):
        lo = (src[r, base + j] >> shift) & 15
        hi = (src[r, base + j + 16] >> shift) & 15
        _put(quads, c, b, j, i, lo | (hi << 4))


@kernel(parallel=True)
def _repack_q4_k(quads, scale, offset, supers, src):
    n_rows, n_super = src.shape[0], supers.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 144
            _k_super_block(scale, offset, supers, src, r, c, i, at, sb)
            for s in range(8):
                _put_k_nibbles(quads, src, r, c, sb * 8 + s, i, at + 16 + 32 * (s // 2), 4 * (s % 2))


@kernel(parallel=True)
def _repack_q5_0(quads, scale, offset, supers, src):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 22
            scale[c, b, i] = _f16_bits(src, r, at)  # code - 16 is the signed value
            for j in range(16):
                _put(quads, c, b, j, i, src[r, at + 6 + j])  # ggml's nibbles are u4's already
            _put_u5_tops(quads, c, b, i, _u32(src, r, at + 2))


@kernel(parallel=True)
def _repack_q5_1(quads, scale, offset, supers, src):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 24
            scale[c, b, i] = _f16_bits(src, r, at)
            offset[c, b, i] = _f16_bits(src, r, at + 2)
            for j in range(16):
                _put(quads, c, b, j, i, src[r, at + 8 + j])
            _put_u5_tops(quads, c, b, i, _u32(src, r, at + 4))


@kernel(parallel=True)
def _repack_q5_k(quads, scale, offset, supers, src):
    n_rows, n_super = src.shape[0], supers.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 176
            _k_super_block(scale, offset, supers, src, r, c, i, at, sb)
            for s in range(8):
                _put_k_nibbles(quads, src, r, c, sb * 8 + s, i, at + 48 + 32 * (s // 2), 4 * (s % 2))
                tops = np.uint32(0)
                for l in range(32):
                    tops |= np.uint32((src[r, at + 16 + l] >> s) & 1) << l
                _put_u5_tops(quads, c, sb * 8 + s, i, tops)


@kernel(parallel=True)
def _repack_q6_k(quads, scale, offset, supers, src):
    n_rows, n_super = src.shape[0], supers.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        codes = np.empty(256, np.uint32)
        for sb in range(n_super):
            at = sb * 210
            supers[c, sb, 0, i] = _f16_bits(src, r, at + 208)
            for g in range(16):
                scale[c, sb * 16 + g, i] = np.int8(src[r, at + 192 + g])
            for half in range(2):
                ql, qh = at + 64 * half, at + 128 + 32 * half
                for l in range(32):
                    h, e = np.uint32(src[r, qh + l]), 128 * half + l  # e: the element within the super-block
                    lo, hi = np.uint32(src[r, ql + l]), np.uint32(src[r, ql + l + 32])
                    codes[e] = (lo & 15) | ((h & 3) << 4)  # the signed code is q - 32: code_bias 32
                    codes[e + 32] = (hi & 15) | (((h >> 2) & 3) << 4)
                    codes[e + 64] = (lo >> 4) | (((h >> 4) & 3) << 4)
                    codes[e + 96] = (hi >> 4) | (((h >> 6) & 3) << 4)
            for g in range(16):
                for j in range(12):
                    last = codes[16 * g + 12 + j % 4]  # two of its bits go with code j
                    byte = codes[16 * g + j] | (((last >> (2 * (j // 4))) & 3) << 6)
                    _put(quads, c, sb * 16 + g, j, i, np.uint8(byte))


@kernel(parallel=True)
def _repack_q8_0(quads, scale, offset, supers, src):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 34
            scale[c, b, i] = _f16_bits(src, r, at)
            for j in range(32):
                _put(quads, c, b, j, i, src[r, at + 2 + j] ^ 0x80)  # flipping the top bit adds 128


@kernel(parallel=True)
def _repack_q2_k(quads, scale, offset, supers, src):
    n_rows, n_super = src.shape[0], supers.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 84
            supers[c, sb, 0, i] = _f16_bits(src, r, at + 80)
            supers[c, sb, 1, i] = _f16_bits(src, r, at + 82)
            for g in range(16):
                sc = src[r, at + g]
                scale[c, sb * 16 + g, i] = sc & 15
                offset[c, sb * 16 + g, i] = sc >> 4
            for e in range(256):
                chunk, k, l = e // 128, (e % 128) // 32, e % 32
                _put(quads, c, sb * 16 + e // 16, e % 16, i, (src[r, at + 16 + 32 * chunk + l] >> (2 * k)) & 3)


@kernel(parallel=True)
def _repack_q3_k(quads, scale, offset, supers, src):
    n_rows, n_super = src.shape[0], supers.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 110
            supers[c, sb, 0, i] = _f16_bits(src, r, at + 108)
            for g in range(16):
                # Mixed signed/unsigned shifts promote to float in Numba: work in int32.
                low = np.int32(src[r, at + 96 + g] & 15) if g < 8 else np.int32(src[r, at + 96 + g - 8] >> 4)
                high = (np.int32(src[r, at + 104 + g % 4]) >> (2 * (g // 4))) & 3
                scale[c, sb * 16 + g, i] = np.int8(np.int32(low | (high << 4)) - 32)
            for e in range(256):
                chunk, k, l = e // 128, (e % 128) // 32, e % 32
                q = (np.int32(src[r, at + 32 + 32 * chunk + l]) >> (2 * k)) & 3
                if not (np.int32(src[r, at + l]) >> (e // 32)) & 1:
                    q -= 4
                _put(quads, c, sb * 16 + e // 16, e % 16, i, np.uint8(q + 128))  # signed, stored + 128


class _Repacker(NamedTuple):
    kernel: Callable
    kind: str
    group: int  # weights per block (per scale)
    code_bias: int  # subtracted from every stored code: the type's codes are signed
    scale_type: type  # uint16: float16 bits; uint8 / int8: a K-quant's sub-block scales, d in `supers`
    offsets: bool  # False where every offset is zero


_REPACKERS = {
    "Q4_0": _Repacker(_repack_q4_0, "u4", 32, 8, np.uint16, False),
    "Q4_1": _Repacker(_repack_q4_1, "u4", 32, 0, np.uint16, True),
    "Q4_K": _Repacker(_repack_q4_k, "u4", 32, 0, np.uint8, True),
    "Q5_0": _Repacker(_repack_q5_0, "u5", 32, 16, np.uint16, False),
    "Q5_1": _Repacker(_repack_q5_1, "u5", 32, 0, np.uint16, True),
    "Q5_K": _Repacker(_repack_q5_k, "u5", 32, 0, np.uint8, True),
    "Q6_K": _Repacker(_repack_q6_k, "u6", 16, 32, np.int8, False),
    "Q8_0": _Repacker(_repack_q8_0, "q8", 32, 128, np.uint16, False),
    "Q2_K": _Repacker(_repack_q2_k, "q8", 16, 0, np.uint8, True),
    "Q3_K": _Repacker(_repack_q3_k, "q8", 16, 128, np.int8, False),
}
SUPER = 256  # weights per K-quant super-block


def layout_variants(layout: str) -> set[tuple[str, bool]]:
    """(scale type, with offsets) of every block type that repacks into the layout: the kernel bodies the
    integer kernel needs for it."""
    return {(np.dtype(how.scale_type).name, how.offsets) for how in _REPACKERS.values()
            if _layout_name(how.kind, how.group) == layout}
_CODE_BYTES = {"u4": 16, "u5": 20, "u6": 12}  # per block; q8 has one per weight
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED = tuple(_REPACKERS) + FLOAT_TYPES
ALIGN = 64  # bytes: each lanes array starts on a cache line

Allocate = Callable[[tuple, type], np.ndarray]  # (shape, dtype) -> a zeroed array
Part = tuple[np.ndarray, GGMLType]  # a GGUF tensor: raw block bytes [n_rows, row_bytes] (or floats), its type


def to_lanes(data: np.ndarray, ggml: GGMLType, n_cols: int, zeros: Allocate = np.zeros) -> LaneMatrix:
    """Repack a 2-D GGUF tensor (raw block bytes [n_rows, row_bytes], or a float view) into lanes layout."""
    return stack_lanes([(data, ggml)], n_cols, zeros)


def stack_lanes(parts: list[Part], n_cols: int, zeros: Allocate = np.zeros) -> LaneMatrix:
    """Tensors with the same inputs repacked as one lanes matrix, their rows stacked in order, so one kernel
    call multiplies them all; `parts` is one of stack_runs' runs. Each part's kernel writes its own chunks
    of the stacked arrays, which come from `zeros` (an arena's, when loading a model)."""
    chunks = [_n_chunks(data.shape[0]) for data, _ in parts]
    n_rows, first = sum(data.shape[0] for data, _ in parts), parts[0][1]
    source = "+".join(sorted({ggml.name for _, ggml in parts}))
    codes, scale, offset, supers = (zeros(shape, dtype) for shape, dtype in _lanes_arrays(first, sum(chunks), n_cols))
    at = 0
    for (data, ggml), n in zip(parts, chunks):
        if ggml.name in FLOAT_TYPES:
            rows = np.zeros((n * CHUNK, n_cols), np.float32)
            rows[: data.shape[0]] = dequantize(data, ggml).reshape(-1, n_cols)
            codes[at : at + n] = rows.reshape(n, CHUNK, n_cols).transpose(0, 2, 1)
        else:
            src = readonly(np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1))
            part = slice(at, at + n)
            _REPACKERS[ggml.name].kernel(codes[part], scale[part], offset[part], supers[part], src)
        at += n
    if first.name in FLOAT_TYPES:
        return LaneMatrix("f32", n_rows, n_cols, codes, scale, offset, supers, source)
    how = _REPACKERS[first.name]
    return LaneMatrix(how.kind, n_rows, n_cols, codes, scale, offset, supers, source, how.code_bias)


def stack_runs(parts: list[Part]) -> list[list[Part]]:
    """The parts as few stackable runs as possible: neighbours join when their lanes share a layout and
    every part of the run fills whole chunks."""
    runs: list[list[Part]] = []
    for part in parts:
        run = runs[-1] if runs else None
        joins = run is not None and _layout(run[0][1]) == _layout(part[1]) and all(
            data.shape[0] % CHUNK == 0 for data, _ in (*run, part))
        if joins:
            run.append(part)
        else:
            runs.append([part])
    return runs


def lanes_nbytes(ggml: GGMLType, n_rows: int, n_cols: int) -> int:
    """Bytes a tensor's lanes take, each array aligned as a WeightArena aligns it (0 for unsupported types)."""
    if ggml.name not in SUPPORTED:
        return 0
    arrays = _lanes_arrays(ggml, _n_chunks(n_rows), n_cols)
    return sum(_aligned(int(np.prod(shape)) * np.dtype(dtype).itemsize) for shape, dtype in arrays)


def _layout(ggml: GGMLType) -> tuple:
    """What decides a type's lanes layout: types that agree on it can share one stacked matrix."""
    if ggml.name in FLOAT_TYPES:
        return ("f32",)
    how = _repacker(ggml)
    return how.kind, how.group, how.code_bias, how.scale_type, how.offsets


def _repacker(ggml: GGMLType) -> _Repacker:
    how = _REPACKERS.get(ggml.name)
    if how is None:
        raise UnsupportedError(f"weights of type {ggml.name} are not supported (supported: {', '.join(SUPPORTED)})")
    return how


def _lanes_arrays(ggml: GGMLType, n_chunks: int, n_cols: int) -> list[tuple[tuple, type]]:
    """(shape, dtype) of the codes, scales, offsets and super-block scales."""
    if ggml.name in FLOAT_TYPES:
        empty = ((n_chunks, 0, CHUNK), np.uint16)
        return [((n_chunks, n_cols, CHUNK), np.float32), empty, empty, ((n_chunks, 0, 1, CHUNK), np.uint16)]
    how = _repacker(ggml)
    n_blocks = n_cols // how.group
    n_quads = _CODE_BYTES.get(how.kind, how.group) // 4
    n_super = n_cols // SUPER if how.scale_type != np.uint16 else 0
    return [((n_chunks, n_blocks, n_quads, CHUNK, 4), np.uint8), ((n_chunks, n_blocks, CHUNK), how.scale_type),
            ((n_chunks, n_blocks if how.offsets else 0, CHUNK), how.scale_type),
            ((n_chunks, n_super, 1 + how.offsets, CHUNK), np.uint16)]


def _n_chunks(n_rows: int) -> int:
    return (n_rows + CHUNK - 1) // CHUNK


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def block_codes(w: LaneMatrix) -> np.ndarray:
    """The codes as [n_chunks, n_blocks, group, CHUNK] int16 with the bias taken out (code j of row i of a
    block at [.., j, i]), nibbles and top bits unpacked: for NumPy."""
    n_chunks, n_blocks, n_quads = w.codes.shape[:3]
    plain = w.codes.transpose(0, 1, 2, 4, 3).reshape(n_chunks, n_blocks, 4 * n_quads, CHUNK).astype(np.int16)
    if w.nibbles:
        nibbles = plain[:, :, :16]
        plain = np.concatenate([nibbles & 15, nibbles >> 4], axis=2)
        if w.kind == "u5":
            high = w.codes[:, :, 4].transpose(0, 1, 3, 2).astype(np.int16)  # [.., m, row]
            bit = 2 * (np.arange(32) % 16 // 4) + np.arange(32) // 16  # code j's bit: 2q + half
            plain |= ((high[:, :, np.arange(32) % 4] >> bit[None, None, :, None]) & 1) << 4
    elif w.kind == "u6":
        tops = plain >> 6  # [.., 12, row]: bits 2p, 2p + 1 of code 12 + m in byte 4p + m
        last = tops[:, :, 0:4] | (tops[:, :, 4:8] << 2) | (tops[:, :, 8:12] << 4)
        plain = np.concatenate([plain & 63, last], axis=2)
    return plain - w.code_bias


def block_scales(w: LaneMatrix) -> tuple[np.ndarray, np.ndarray | None]:
    """Each block's scale and offset (None without offsets) as float32 [n_chunks, n_blocks, CHUNK]: float16
    bits as they are, or a K-quant's d * sc and -(dmin * mn), with NumPy."""
    if w.scale.dtype == np.uint16:
        as_float = lambda a: a.view(np.float16).astype(np.float32)
        return as_float(w.scale), as_float(w.offset) if w.offset.shape[1] else None
    per_super = SUPER // w.group
    d = w.supers.view(np.float16).astype(np.float32).repeat(per_super, axis=1)  # [.., n_blocks, 1 or 2, CHUNK]
    scale = d[:, :, 0] * w.scale.astype(np.float32)
    return scale, -(d[:, :, 1] * w.offset.astype(np.float32)) if w.offset.shape[1] else None


def lanes_to_float(w: LaneMatrix) -> np.ndarray:
    """Dequantize a lanes matrix to float32 [n_rows, n_cols] with NumPy (the test oracle's view of it)."""
    if w.kind == "f32":
        vals = w.codes  # [n_chunks, n_cols, CHUNK]
    else:
        scale, offset = block_scales(w)
        vals = scale[:, :, None, :] * block_codes(w).astype(np.float32)
        if offset is not None:
            vals = vals + offset[:, :, None, :]
        vals = vals.reshape(vals.shape[0], -1, CHUNK)
    return vals.transpose(0, 2, 1).reshape(-1, w.n_cols)[: w.n_rows].copy()


class WeightArena:
    """A model's weights, bump-allocated from one private anonymous mapping marked for 2 MB pages.

    Decoding streams every weight once per token: with 4 KB pages that is a TLB miss every 4 KB, and NumPy
    asks for huge pages only for arrays of 4 MB and more (26 of SmolLM2's 96 MB). In one mapping all of it
    gets them: SmolLM2 decoded 13-16% faster at 1 thread (Gemma, whose 178 MB output had them already, no
    measurable change). The repacking writes straight into it: fresh memory faults on first touch, costly on
    a VM, and copying into the mapping afterwards touched the weights' bytes twice (0.05-0.5 s for Gemma).
    Reserve what the lanes will take (lanes_nbytes); should it run out, arrays come from NumPy instead."""

    def __init__(self, reserve: int):
        try:
            self._buffer = _huge_page_buffer(max(reserve, ALIGN))
        except (OSError, MemoryError):
            raise LlambaError(f"not enough memory for the model's weights ({reserve / 1e9:.1f} GB once repacked)") from None
        self._used = 0

    def zeros(self, shape: tuple, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self._used + n > len(self._buffer):
            return np.zeros(shape, dtype)
        array = self._buffer[self._used : self._used + n].view(dtype).reshape(shape)  # never used: still zero
        self._used += _aligned(n)
        return array


def _huge_page_buffer(size: int) -> np.ndarray:
    """size bytes of private anonymous memory the kernel is asked to back with 2 MB pages (Linux; elsewhere,
    or without mmap's flags, ordinary memory). Private: shared anonymous memory gets no transparent huge pages."""
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MADV_HUGEPAGE")):
        return np.zeros(size, np.uint8)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, np.uint8)
