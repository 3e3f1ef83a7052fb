"""Repack GGML blocks into the lanes layout the matrix kernels vectorize over.

GGML stores a weight matrix row by row, each row a run of blocks. A matrix-vector product over that layout
needs a horizontal sum per block, which Numba does not vectorize. The lanes layout transposes it within chunks
of CHUNK output rows: for each block of the input dimension, the codes of the chunk's rows sit side by side, so
the kernels' inner loops run over rows, one SIMD lane per row, with no horizontal sums. Each chunk is one
contiguous run of memory, read front to back, which the prefetchers love. Every block type becomes one of:

- `u4`: 4-bit codes, 32 per block, byte j holding codes j (low nibble) and j+16 (high nibble);
                                                                                  (Q4_0, Q4_1, Q4_K)
- `u5`: 5-bit codes, 32 per block: the nibbles as u4, then 4 bytes of top bits (see _pack_u5);
                                                                                  (Q5_0, Q5_1, Q5_K)
- `q8`: one code per byte, `group` (16 or 32) per block;                  (Q6_K, Q8_0, Q2_K, Q3_K)
- `f32`: plain floats, codes [n_chunks, n_cols, CHUNK] float32.                    (F32, F16, BF16)

The code bytes of a block go in quads, the integer dot product's unit (see int8_dot): codes
[n_chunks, n_blocks, n_quads, CHUNK, 4] uint8, quad q holding code bytes 4q..4q+3 of every row side by side.
Codes are unsigned: signed types store code + 128 (code_bias = 128), which the kernels take back out exactly.
Weight = scale * (code - code_bias) + offset, scale and offset [n_chunks, n_blocks, CHUNK]. The scales are ggml's own
numbers (d, or d times the sub-block scale), so dequantizing the lanes gives ggml's values bit for bit. Where
they are the file's float16 values (Q4_0..Q8_0) they stay float16 (as uint16 bits), and types with signed codes
store no offsets: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 then take exactly the file's bytes; the K-quants keep float32
scales (products that float16 cannot hold exactly) and take about 1.3x. Rows past n_rows in the last chunk are zero.
The layout is built once at load, in parallel.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numba
import numpy as np

from ..errors import UnsupportedError
from ..formats.ggml_types import GGMLType
from ..formats.quants import dequantize
from .jit import F16_TABLE, kernel, readonly

CHUNK = 32  # output rows per chunk: the lanes a kernel's inner loop runs over


@dataclass
class LaneMatrix:
    """A weight matrix [n_rows, n_cols] (y = W x maps n_cols inputs to n_rows outputs) in lanes layout."""

    kind: str  # "u4", "u5", "q8" or "f32"
    n_rows: int
    n_cols: int
    codes: np.ndarray
    scale: np.ndarray  # [n_chunks, n_blocks, CHUNK] float32, or float16 bits as uint16 (empty for f32)
    offset: np.ndarray  # like scale; [n_chunks, 0, CHUNK] for types without offsets
    source_type: str
    code_bias: int = 0  # 128 where the type's codes are signed (stored as code + 128)

    @property
    def nibbles(self) -> bool:
        """Codes packed two to a byte (u4, and u5 with its quad of top bits)."""
        return self.kind in ("u4", "u5")

    @property
    def group(self) -> int:
        return 32 if self.nibbles else 4 * self.codes.shape[2] if self.kind == "q8" else 1

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.offset.nbytes


# ------------------------------------------------------------------------------------- block decoders
# Each decodes row r of src into the lanes arrays. They are small and parallel over rows.

@kernel
def _f16(src, r, at, table):
    return table[np.int32(src[r, at]) | (np.int32(src[r, at + 1]) << 8)]


@kernel(parallel=True)
def _repack_q4_0(codes, scale, offset, src, table):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 18
            scale[c, b, i] = _f16(src, r, at, table)  # weight d * (code - 8): the code bias, no offset
            for j in range(16):
                codes[c, b, j, i] = src[r, at + 2 + j]


@kernel(parallel=True)
def _repack_q4_1(codes, scale, offset, src, table):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 20
            scale[c, b, i] = _f16(src, r, at, table)
            offset[c, b, i] = _f16(src, r, at + 2, table)
            for j in range(16):
                codes[c, b, j, i] = src[r, at + 4 + j]


@kernel
def _u32(src, r, at):
    """A little-endian uint32 at byte `at` of row r (the high bits of Q5_0 / Q5_1)."""
    return (np.uint32(src[r, at]) | (np.uint32(src[r, at + 1]) << 8)
            | (np.uint32(src[r, at + 2]) << 16) | (np.uint32(src[r, at + 3]) << 24))


@kernel
def _k_sub_block(scale, offset, src, r, c, i, at, s, b):
    """Scale and offset of sub-block s of the Q4_K/Q5_K super-block at byte `at` (d, dmin, 12 scale bytes)."""
    d, dmin = _f16(src, r, at, F16_TABLE), _f16(src, r, at + 2, F16_TABLE)
    sc, mn = _k_scale_min(src, r, at + 4, s)
    scale[c, b, i] = d * np.float32(sc)
    offset[c, b, i] = -(dmin * np.float32(mn))


@kernel
def _k_scale_min(src, r, at, s):
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block s from the 12 bytes at `at`."""
    if s < 4:
        return src[r, at + s] & 63, src[r, at + s + 4] & 63
    sc = (src[r, at + s + 4] & 0x0F) | ((src[r, at + s - 4] >> 6) << 4)
    mn = (src[r, at + s + 4] >> 4) | ((src[r, at + s] >> 6) << 4)
    return sc, mn


@kernel(parallel=True)
def _repack_q4_k(codes, scale, offset, src, table):
    n_rows, n_super = src.shape[0], scale.shape[1] // 8
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 144
            for s in range(8):
                b = sb * 8 + s
                _k_sub_block(scale, offset, src, r, c, i, at, s, b)
                base, shift = at + 16 + 32 * (s // 2), 4 * (s % 2)
                for j in range(16):
                    lo = (src[r, base + j] >> shift) & 15
                    hi = (src[r, base + j + 16] >> shift) & 15
                    codes[c, b, j, i] = lo | (hi << 4)


@kernel(parallel=True)
def _repack_q5_0(codes, scale, offset, src, table):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 22
            scale[c, b, i] = _f16(src, r, at, table)
            offset[c, b, i] = 0.0
            qh = _u32(src, r, at + 2)
            for j in range(16):
                q = src[r, at + 6 + j]
                codes[c, b, j, i] = (q & 15) | (((qh >> j) & 1) << 4)  # code - 16 is the signed value
                codes[c, b, j + 16, i] = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)


@kernel(parallel=True)
def _repack_q5_1(codes, scale, offset, src, table):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 24
            scale[c, b, i] = _f16(src, r, at, table)
            offset[c, b, i] = _f16(src, r, at + 2, table)
            qh = _u32(src, r, at + 4)
            for j in range(16):
                q = src[r, at + 8 + j]
                codes[c, b, j, i] = (q & 15) | (((qh >> j) & 1) << 4)
                codes[c, b, j + 16, i] = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)


@kernel(parallel=True)
def _repack_q5_k(codes, scale, offset, src, table):
    n_rows, n_super = src.shape[0], scale.shape[1] // 8
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 176
            for s in range(8):
                b = sb * 8 + s
                _k_sub_block(scale, offset, src, r, c, i, at, s, b)
                base, shift = at + 48 + 32 * (s // 2), 4 * (s % 2)
                for l in range(32):
                    high = (src[r, at + 16 + l] >> s) & 1
                    codes[c, b, l, i] = ((src[r, base + l] >> shift) & 15) | (high << 4)


@kernel(parallel=True)
def _repack_q6_k(codes, scale, offset, src, table):
    n_rows, n_super = src.shape[0], scale.shape[1] // 16
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 210
            d = _f16(src, r, at + 208, table)
            for g in range(16):
                sc = np.int8(src[r, at + 192 + g])
                scale[c, sb * 16 + g, i] = d * np.float32(sc)
                offset[c, sb * 16 + g, i] = 0.0
            for half in range(2):
                ql, qh = at + 64 * half, at + 128 + 32 * half
                for l in range(32):
                    h = src[r, qh + l]
                    e = 128 * half + l  # element index within the super-block
                    q1 = (src[r, ql + l] & 15) | ((h & 3) << 4)
                    q2 = (src[r, ql + l + 32] & 15) | (((h >> 2) & 3) << 4)
                    q3 = (src[r, ql + l] >> 4) | (((h >> 4) & 3) << 4)
                    q4 = (src[r, ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)
                    for k, q in ((0, q1), (32, q2), (64, q3), (96, q4)):
                        codes[c, sb * 16 + (e + k) // 16, (e + k) % 16, i] = np.int8(np.int32(q) - 32)


@kernel(parallel=True)
def _repack_q8_0(codes, scale, offset, src, table):
    n_rows, n_blocks = src.shape[0], scale.shape[1]
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for b in range(n_blocks):
            at = b * 34
            scale[c, b, i] = _f16(src, r, at, table)
            offset[c, b, i] = 0.0
            for j in range(32):
                codes[c, b, j, i] = np.int8(src[r, at + 2 + j])


@kernel(parallel=True)
def _repack_q2_k(codes, scale, offset, src, table):
    n_rows, n_super = src.shape[0], scale.shape[1] // 16
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 84
            d, dmin = _f16(src, r, at + 80, table), _f16(src, r, at + 82, table)
            for g in range(16):
                sc = src[r, at + g]
                scale[c, sb * 16 + g, i] = d * np.float32(sc & 15)
                offset[c, sb * 16 + g, i] = -(dmin * np.float32(sc >> 4))
            for e in range(256):
                chunk, k, l = e // 128, (e % 128) // 32, e % 32
                codes[c, sb * 16 + e // 16, e % 16, i] = (src[r, at + 16 + 32 * chunk + l] >> (2 * k)) & 3


@kernel(parallel=True)
def _repack_q3_k(codes, scale, offset, src, table):
    n_rows, n_super = src.shape[0], scale.shape[1] // 16
    for r in numba.prange(n_rows):
        c, i = r // CHUNK, r % CHUNK
        for sb in range(n_super):
            at = sb * 110
            d = _f16(src, r, at + 108, table)
            for g in range(16):
                # Mixed signed/unsigned shifts promote to float in Numba: work in int32.
                low = np.int32(src[r, at + 96 + g] & 15) if g < 8 else np.int32(src[r, at + 96 + g - 8] >> 4)
                high = (np.int32(src[r, at + 104 + g % 4]) >> (2 * (g // 4))) & 3
                scale[c, sb * 16 + g, i] = d * np.float32(np.int32(low | (high << 4)) - 32)
                offset[c, sb * 16 + g, i] = 0.0
            for e in range(256):
                chunk, k, l = e // 128, (e % 128) // 32, e % 32
                q = (np.int32(src[r, at + 32 + 32 * chunk + l]) >> (2 * k)) & 3
                if not (np.int32(src[r, at + l]) >> (e // 32)) & 1:
                    q -= 4
                codes[c, sb * 16 + e // 16, e % 16, i] = np.int8(q)


# type -> (kernel, kind, group, code dtype, code bias): signed (int8) codes are stored + 128
_REPACKERS = {
    "Q4_0": (_repack_q4_0, "u4", 32, np.uint8, 8),
    "Q4_1": (_repack_q4_1, "u4", 32, np.uint8, 0),
    "Q4_K": (_repack_q4_k, "u4", 32, np.uint8, 0),
    "Q5_0": (_repack_q5_0, "u5", 32, np.uint8, 16),
    "Q5_1": (_repack_q5_1, "u5", 32, np.uint8, 0),
    "Q5_K": (_repack_q5_k, "u5", 32, np.uint8, 0),
    "Q6_K": (_repack_q6_k, "q8", 16, np.int8, 128),
    "Q8_0": (_repack_q8_0, "q8", 32, np.int8, 128),
    "Q2_K": (_repack_q2_k, "q8", 16, np.uint8, 0),
    "Q3_K": (_repack_q3_k, "q8", 16, np.int8, 128),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED = tuple(_REPACKERS) + FLOAT_TYPES


def to_lanes(data: np.ndarray, ggml: GGMLType, n_cols: int) -> LaneMatrix:
    """Repack a 2-D GGUF tensor (raw block bytes [n_rows, row_bytes], or a float view) into lanes layout."""
    n_rows = data.shape[0]
    n_chunks = (n_rows + CHUNK - 1) // CHUNK
    if ggml.name in FLOAT_TYPES:
        padded = np.zeros((n_chunks * CHUNK, n_cols), np.float32)
        padded[:n_rows] = dequantize(data, ggml).reshape(n_rows, n_cols)
        codes = np.ascontiguousarray(padded.reshape(n_chunks, CHUNK, n_cols).transpose(0, 2, 1))
        empty = np.zeros((n_chunks, 0, CHUNK), np.float32)
        return LaneMatrix("f32", n_rows, n_cols, codes, empty, empty, ggml.name)
    entry = _REPACKERS.get(ggml.name)
    if entry is None:
        raise UnsupportedError(f"weights of type {ggml.name} are not supported (supported: {', '.join(SUPPORTED)})")
    fn, kind, group, code_dtype, bias = entry
    n_blocks = n_cols // group
    codes = np.zeros((n_chunks, n_blocks, 16 if kind == "u4" else group, CHUNK), code_dtype)
    scale = np.zeros((n_chunks, n_blocks, CHUNK), np.float32)
    offset = np.zeros((n_chunks, n_blocks, CHUNK), np.float32)
    src = readonly(np.ascontiguousarray(data).view(np.uint8).reshape(n_rows, -1))
    fn(codes, scale, offset, src, F16_TABLE)
    scale, offset = _compact_scales(ggml.name, scale, offset)
    if kind == "u5":
        codes = _pack_u5(codes)
    return LaneMatrix(kind, n_rows, n_cols, _to_quads(codes), scale, offset, ggml.name, bias)


def _pack_u5(codes: np.ndarray) -> np.ndarray:
    """5-bit codes [.., 32, CHUNK] (0..31) -> 20 bytes per row and block: 16 bytes of nibbles as u4 (byte j:
    codes j and j + 16), then 4 bytes of top bits, byte m holding bit 2q for code 4q + m and bit 2q + 1 for
    code 4q + m + 16 (q = 0..3). As quads: four of nibbles and one of top bits, which the kernel merges in
    registers (int8_dot)."""
    n_chunks, n_blocks = codes.shape[:2]
    nibbles = (codes[:, :, :16] & 15) | ((codes[:, :, 16:] & 15) << 4)
    top = (codes >> 4).reshape(n_chunks, n_blocks, 2, 4, 4, CHUNK)  # [half, q, m, row]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).T  # [half, q]: bit 2q + half
    high = (top << shifts[None, None, :, :, None, None].astype(np.uint8)).sum(axis=(2, 3), dtype=np.uint8)
    return np.concatenate([nibbles, high], axis=2)


def _to_quads(codes: np.ndarray) -> np.ndarray:
    """[n_chunks, n_blocks, n_bytes, CHUNK] codes -> quads [n_chunks, n_blocks, n_bytes / 4, CHUNK, 4] uint8;
    signed codes gain 128 (flipping the top bit of a two's complement byte adds 128)."""
    n_chunks, n_blocks, n_bytes = codes.shape[:3]
    quads = np.empty((n_chunks, n_blocks, n_bytes // 4, CHUNK, 4), np.uint8)
    _gather_quads(readonly(codes.view(np.uint8)), np.uint8(0x80 if codes.dtype == np.int8 else 0), quads)
    return quads


@kernel(parallel=True)
def _gather_quads(codes, flip, quads):
    """quads[c, b, q, i, m] = codes[c, b, 4q + m, i] ^ flip, in parallel over chunks (NumPy's transposing copy
    of these 4-byte runs took a quarter of loading a model)."""
    for c in numba.prange(codes.shape[0]):
        for b in range(codes.shape[1]):
            for q in range(quads.shape[2]):
                for i in range(CHUNK):
                    for m in range(4):
                        quads[c, b, q, i, m] = codes[c, b, 4 * q + m, i] ^ flip


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
    return plain - w.code_bias


# Types whose scales and offsets are the file's own float16 numbers (or exact multiples of them by a power
# of two): stored as float16 bits they take half the bytes, and decoding is memory-bound.
_F16_SCALES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
_NO_OFFSETS = {"Q4_0", "Q5_0", "Q8_0", "Q6_K", "Q3_K"}  # signed codes: every offset is zero


def _compact_scales(type_name: str, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if type_name in _NO_OFFSETS:
        offset = np.zeros((scale.shape[0], 0, CHUNK), scale.dtype)
    if type_name in _F16_SCALES:
        halves = scale.astype(np.float16), offset.astype(np.float16)
        if all(np.array_equal(h.astype(np.float32), f) for h, f in zip(halves, (scale, offset))):
            scale, offset = (h.view(np.uint16) for h in halves)
    return scale, offset


def _scales_f32(a: np.ndarray) -> np.ndarray:
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def lanes_to_float(w: LaneMatrix) -> np.ndarray:
    """Dequantize a lanes matrix to float32 [n_rows, n_cols] with NumPy (the test oracle's view of it)."""
    if w.kind == "f32":
        vals = w.codes  # [n_chunks, n_cols, CHUNK]
    else:
        vals = _scales_f32(w.scale)[:, :, None, :] * block_codes(w).astype(np.float32)
        if w.offset.shape[1]:
            vals = vals + _scales_f32(w.offset)[:, :, None, :]
        vals = vals.reshape(vals.shape[0], -1, CHUNK)
    return vals.transpose(0, 2, 1).reshape(-1, w.n_cols)[: w.n_rows].copy()


def into_one_buffer(matrices: list[LaneMatrix]) -> None:
    """Move the matrices' arrays into one anonymous mapping marked for 2 MB pages (in place; shared arrays
    once). Decoding streams every weight once per token: with 4 KB pages that is a TLB miss every 4 KB, and
    only arrays of 4 MB and more got huge pages from NumPy (26 of SmolLM2's 96 MB). In one buffer all of them
    do: SmolLM2 then decoded 13-16% faster at 1 thread (Gemma, whose 178 MB output had them already, no
    measurable change). Each array is copied and its old memory freed in turn, so the peak stays near one copy
    of the weights."""
    # array id -> (the array, where it is held): a tied embedding is also the output, and is moved once
    moves: dict[int, tuple[np.ndarray, list[tuple[LaneMatrix, str]]]] = {}
    for w in matrices:
        for name in ("codes", "scale", "offset"):
            if (a := getattr(w, name)).size:
                moves.setdefault(id(a), (a, []))[1].append((w, name))
    aligned = lambda n: -(-n // 64) * 64
    size = sum(aligned(a.nbytes) for a, _ in moves.values())
    if not size:
        return
    buffer, at = _huge_page_buffer(size), 0
    for key in list(moves):
        a, holders = moves.pop(key)
        moved = buffer[at : at + a.nbytes].view(a.dtype).reshape(a.shape)
        moved[...] = a
        for w, name in holders:
            setattr(w, name, moved)
        at += aligned(a.nbytes)
        del a  # the last reference: its memory goes back before the next array is copied


def _huge_page_buffer(size: int) -> np.ndarray:
    """size bytes of private anonymous memory the kernel is asked to back with 2 MB pages (Linux; elsewhere,
    or without mmap's flags, ordinary memory). Private: shared anonymous memory gets no transparent huge pages."""
    if not (hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MADV_HUGEPAGE")):
        return np.empty(size, np.uint8)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, np.uint8)


def concat_rows(parts: list[LaneMatrix]) -> LaneMatrix | None:
    """Stack matrices with the same inputs into one ([sum n_rows, n_cols]) so one kernel call does all;
    None when they cannot share a layout (different kinds, groups or code types, or rows off the chunk grid)."""
    first = parts[0]
    compatible = all(
        p.kind == first.kind and p.n_cols == first.n_cols and p.code_bias == first.code_bias
        and p.codes.shape[1:] == first.codes.shape[1:] and p.n_rows % CHUNK == 0
        and p.scale.dtype == first.scale.dtype and p.offset.shape[1:] == first.offset.shape[1:]
        for p in parts
    )
    if not compatible:
        return None
    return LaneMatrix(
        first.kind, sum(p.n_rows for p in parts), first.n_cols,
        np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
        np.concatenate([p.offset for p in parts]), "+".join(sorted({p.source_type for p in parts})),
        first.code_bias,
    )
