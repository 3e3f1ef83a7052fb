"""NumPy dequantize/quantize for GGML block formats: the converter's tool and the kernels' oracle.

Dequantizers follow ggml's arithmetic order exactly (float32 throughout, no fused multiply-add), so their
output is bit-identical to ggml's and to the `gguf` package's. The simple quantizers (Q4_0 .. Q8_0) reproduce
ggml's reference quantizers bit for bit; the K-quant quantizers fit scales by a short search and are
bounded by their round-trip error, as ggml's own are.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import UnsupportedError
from .ggml_types import QK_K, GGMLType, ggml_type

F32 = np.float32


# ---------------------------------------------------------------------------------------------- helpers

def _blocks(data: np.ndarray, t: GGMLType) -> tuple[np.ndarray, tuple[int, ...]]:
    """View data (raw bytes or a typed array) as [n_blocks, block_bytes] and give the element shape."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    if raw.ndim == 0 or raw.shape[-1] % t.block_bytes:
        raise UnsupportedError(f"{t.name}: last dimension of {raw.shape} bytes is not a whole number of blocks")
    shape = (*raw.shape[:-1], raw.shape[-1] // t.block_bytes * t.block_elements)
    return raw.reshape(-1, t.block_bytes), shape


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """A float16 field at byte `start` of each block, as float32 [n_blocks, 1]."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(F32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Unpack 4-bit values: each run of `group` bytes holds `group` low nibbles, then `group` high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(n, -1)


def _bits(packed: np.ndarray, n_bits: int, n_shifts: int, group: int) -> np.ndarray:
    """Unpack n_bits-wide fields: each run of `group` bytes yields n_shifts runs of `group` values."""
    n = packed.shape[0]
    shifts = (np.arange(n_shifts, dtype=np.uint8) * n_bits).reshape(1, 1, n_shifts, 1)
    q = packed.reshape(n, -1, 1, group) >> shifts
    return (q & ((1 << n_bits) - 1)).reshape(n, -1)


def _qh_bits(qh: np.ndarray, n_values: int) -> np.ndarray:
    """The high bit of each of n_values quants, packed little-endian in a uint32 (Q5_0, Q5_1)."""
    bits = qh.copy().view("<u4") >> np.arange(n_values, dtype=np.uint32)
    return (bits & 1).astype(np.uint8)


def k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte, 6-bit scales and mins of Q4_K/Q5_K into two [n_blocks, 8] arrays."""
    s = scales.reshape(-1, 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    return sc, mn


# ----------------------------------------------------------------------------------------- dequantizers

def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.copy().view("<u2").astype(np.uint32) << 16).view(F32)


def _deq_f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f2").astype(F32)


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.copy().view("<f4")


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:], 16).astype(np.int8) - np.int8(8)
    return _f16(b, 0) * q.astype(F32)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b, 0) * _nibbles(b[:, 4:], 16).astype(F32) + _f16(b, 2)


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    q = (_nibbles(b[:, 6:], 16) | (_qh_bits(b[:, 2:6], 32) << 4)).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(F32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:], 16) | (_qh_bits(b[:, 4:8], 32) << 4)
    return _f16(b, 0) * q.astype(F32) + _f16(b, 2)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(F32) * _f16(b, 0)


def _deq_q8_k(b: np.ndarray) -> np.ndarray:
    d = b[:, :4].copy().view("<f4")
    return d * b[:, 4 : 4 + QK_K].view(np.int8).astype(F32)


def _deq_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).astype(F32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).astype(F32)).reshape(n, 16, 1)
    q = _bits(qs, 2, 4, 32).reshape(n, 16, 16).astype(F32)
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b, 108)
    # 16 six-bit scales: low 4 bits in bytes 0-7 (two per byte), high 2 bits in bytes 8-11 (four per byte).
    low = _bits(packed[:, :8], 4, 2, 8)
    high = _bits(packed[:, 8:], 2, 4, 4)
    scales = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(F32)
    dl = (d * scales).reshape(n, 16, 1)
    q_low = _bits(qs, 2, 4, 32).reshape(n, 16, 16)
    # The high bit set means "no offset": q = low - 4 where the hmask bit is clear.
    q_high = (_bits(hmask, 1, 8, 32).reshape(n, 16, 16) ^ 1) << 2
    q = (q_low.astype(np.int8) - q_high.astype(np.int8)).astype(F32)
    return (dl * q).reshape(n, QK_K)


def _k_scaled(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Shared tail of Q4_K and Q5_K: (d * scale) * q - dmin * min per 32-element sub-block."""
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.astype(F32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.astype(F32)).reshape(n, 8, 1)
    return (d * q.reshape(n, 8, 32).astype(F32) - dm).reshape(n, QK_K)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    return _k_scaled(b, _nibbles(b[:, 16:], 32))


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    qh = _bits(b[:, 16:48], 1, 8, 32)
    return _k_scaled(b, _nibbles(b[:, 48:], 32) | (qh << 4))


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b, 208)
    dl = (d * scales.view(np.int8).astype(F32)).reshape(n, 16, 1)
    q = (_nibbles(ql, 64) | (_bits(qh, 2, 4, 32) << 4)).astype(np.int8) - np.int8(32)
    return (dl * q.reshape(n, 16, 16).astype(F32)).reshape(n, QK_K)


_DEQUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _deq_f32, "F16": _deq_f16, "BF16": _deq_bf16,
    "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0, "Q5_1": _deq_q5_1, "Q8_0": _deq_q8_0,
    "Q2_K": _deq_q2_k, "Q3_K": _deq_q3_k, "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k, "Q6_K": _deq_q6_k,
    "Q8_K": _deq_q8_k,
}
DEQUANTIZABLE = tuple(_DEQUANTIZERS)


def _implementation(table: dict, type_: GGMLType | str | int, verb: str) -> tuple[GGMLType, Callable]:
    t = type_ if isinstance(type_, GGMLType) else ggml_type(type_)
    fn = table.get(t.name)
    if fn is None:
        raise UnsupportedError(f"{verb} {t.name} is not supported (supported: {', '.join(table)})")
    return t, fn


def dequantize(data: np.ndarray, type_: GGMLType | str | int) -> np.ndarray:
    """Blocks of `type_` (raw bytes [..., row_bytes] or a typed view) -> float32 [..., row_elements]."""
    t, fn = _implementation(_DEQUANTIZERS, type_, "dequantizing")
    blocks, shape = _blocks(data, t)
    return fn(blocks).reshape(shape)


# ------------------------------------------------------------------------------------------- quantizers

def _round_away(x: np.ndarray) -> np.ndarray:
    """roundf(): halves away from zero, unlike np.round's halves to even."""
    return np.sign(x) * np.floor(np.abs(x) + F32(0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _to_f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)


def _pack_nibbles(q: np.ndarray, group: int) -> np.ndarray:
    """Inverse of _nibbles: runs of 2*group values -> group bytes (first half low nibble, second half high)."""
    n = q.shape[0]
    q = q.reshape(n, -1, 2, group).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, -1)


def _pack_bits(q: np.ndarray, n_bits: int, n_shifts: int, group: int) -> np.ndarray:
    """Inverse of _bits."""
    n = q.shape[0]
    q = q.reshape(n, -1, n_shifts, group).astype(np.uint8)
    out = np.zeros((n, q.shape[1], group), np.uint8)
    for i in range(n_shifts):
        out |= (q[:, :, i] & ((1 << n_bits) - 1)) << (i * n_bits)
    return out.reshape(n, -1)


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, with its sign (ggml's Q4_0/Q5_0 use it)."""
    idx = np.abs(x).argmax(axis=-1)[:, None]
    return np.take_along_axis(x, idx, axis=-1)


def _q_sym(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    d = _absmax_signed(x) / F32(-levels // 2)
    q = np.trunc(x * _inverse(d) + F32(levels // 2 + 0.5)).astype(np.uint8).clip(0, levels - 1)
    return d, q


def _q_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = (hi - lo) / F32(levels - 1)
    q = np.trunc((x - lo) * _inverse(d) + F32(0.5)).astype(np.uint8).clip(0, levels - 1)
    return d, lo, q


def _qh_bytes(q: np.ndarray) -> np.ndarray:
    return np.packbits((q >> 4).reshape(q.shape[0], 32), axis=-1, bitorder="little")


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _q_sym(x, 16)
    return np.concatenate([_to_f16_bytes(d), _pack_nibbles(q, 16)], axis=-1)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _q_affine(x, 16)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(lo), _pack_nibbles(q, 16)], axis=-1)


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _q_sym(x, 32)
    return np.concatenate([_to_f16_bytes(d), _qh_bytes(q), _pack_nibbles(q & 0x0F, 16)], axis=-1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    d, lo, q = _q_affine(x, 32)
    return np.concatenate([_to_f16_bytes(d), _to_f16_bytes(lo), _qh_bytes(q), _pack_nibbles(q & 0x0F, 16)], axis=-1)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1, keepdims=True) / F32(127)
    q = _round_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_to_f16_bytes(d), q], axis=-1)


def _q_f16(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8)


def _q_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _q_bf16(x: np.ndarray) -> np.ndarray:
    n = x.view(np.uint32)
    # NaNs stay NaN (quieted); everything else rounds to nearest even, as ggml_compute_fp32_to_bf16.
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype("<u2").view(np.uint8)


# K-quants: per sub-block an affine (scale, min) or a symmetric scale, searched over a few candidate
# scales to minimise squared error, then the scales themselves quantized against one super-block scale.

def _fit_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x [m, k]: scale and min >= 0 with x ~ scale*q - min, q in [0, levels), least squares-ish."""
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0)
    hi = x.max(axis=-1, keepdims=True)
    best_scale = (hi - lo) / F32(levels - 1)
    best_min = -lo
    best_err = _affine_err(x, best_scale, best_min, levels)
    for shrink in (0.98, 0.96, 0.94, 0.92, 0.90):
        # Shrinking the range clips outliers but refines the grid for the bulk; keep what wins.
        scale = (hi - lo) * F32(shrink) / F32(levels - 1)
        for shift in (0.0, 0.5):
            mn = -lo - scale * F32(shift * (1 - shrink) * (levels - 1))
            mn = np.maximum(mn, 0)
            err = _affine_err(x, scale, mn, levels)
            better = err < best_err
            best_scale = np.where(better, scale, best_scale)
            best_min = np.where(better, mn, best_min)
            best_err = np.minimum(err, best_err)
    return best_scale[:, 0], best_min[:, 0]


def _affine_err(x: np.ndarray, scale: np.ndarray, mn: np.ndarray, levels: int) -> np.ndarray:
    q = np.clip(np.round((x + mn) * _inverse(scale)), 0, levels - 1)
    return ((scale * q - mn - x) ** 2).sum(axis=-1, keepdims=True)


def _quantize_scales(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """values [n, m] >= 0 -> (d as float16-rounded float32 [n, 1], integer codes [n, m] in [0, top])."""
    d = (values.max(axis=-1, keepdims=True) / F32(top)).astype(np.float16).astype(F32)
    codes = np.clip(np.round(values * _inverse(d)), 0, top).astype(np.uint8)
    return d, codes


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of k_scale_min: eight 6-bit scales and mins -> 12 bytes."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _k_affine_codes(x: np.ndarray, levels: int):
    """Shared head of Q4_K/Q5_K: fitted sub-block scales and mins, quantized, and the quants they give."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scale, mn = _fit_affine(sub, levels)
    d, sc = _quantize_scales(scale.reshape(n, 8), 63)
    dmin, mc = _quantize_scales(mn.reshape(n, 8), 63)
    eff_scale = (d * sc.astype(F32)).reshape(n * 8, 1)
    eff_min = (dmin * mc.astype(F32)).reshape(n * 8, 1)
    q = np.clip(np.round((sub + eff_min) * _inverse(eff_scale)), 0, levels - 1).astype(np.uint8)
    head = np.concatenate([_to_f16_bytes(d), _to_f16_bytes(dmin), _pack_k_scales(sc, mc)], axis=-1)
    return head, q.reshape(n, QK_K)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    head, q = _k_affine_codes(x, 16)
    return np.concatenate([head, _pack_nibbles(q, 32)], axis=-1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    head, q = _k_affine_codes(x, 32)
    return np.concatenate([head, _pack_bits(q >> 4, 1, 8, 32), _pack_nibbles(q & 0x0F, 32)], axis=-1)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    # Symmetric: the value of largest magnitude maps to -32, as ggml's make_qx_quants starts from.
    scale = (_absmax_signed(sub) / F32(-32))[:, 0]
    top = np.abs(scale).reshape(n, 16).max(axis=-1, keepdims=True)
    d = (top / F32(127)).astype(np.float16).astype(F32)
    sc = np.clip(np.round(scale.reshape(n, 16) * _inverse(d)), -128, 127).astype(np.int8)
    eff = (d * sc.astype(F32)).reshape(n * 16, 1)
    q = (np.clip(np.round(sub * _inverse(eff)), -32, 31) + 32).astype(np.uint8).reshape(n, QK_K)
    ql = _pack_nibbles(q & 0x0F, 64)
    qh = _pack_bits(q >> 4, 2, 4, 32)
    return np.concatenate([ql, qh, sc.view(np.uint8), _to_f16_bytes(d)], axis=-1)


_QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": _q_f32, "F16": _q_f16, "BF16": _q_bf16,
    "Q4_0": _q_q4_0, "Q4_1": _q_q4_1, "Q5_0": _q_q5_0, "Q5_1": _q_q5_1, "Q8_0": _q_q8_0,
    "Q4_K": _q_q4_k, "Q5_K": _q_q5_k, "Q6_K": _q_q6_k,
}
QUANTIZABLE = tuple(_QUANTIZERS)


def quantize(values: np.ndarray, type_: GGMLType | str | int) -> np.ndarray:
    """float32 [..., row_elements] -> raw blocks uint8 [..., row_bytes] of `type_`."""
    t, fn = _implementation(_QUANTIZERS, type_, "quantizing to")
    x = np.ascontiguousarray(values, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % t.block_elements:
        raise UnsupportedError(f"{t.name}: row length {x.shape[-1:]} is not a multiple of {t.block_elements}")
    blocks = x.reshape(-1, t.block_elements)
    out = fn(blocks).astype(np.uint8, copy=False)
    return out.reshape(*x.shape[:-1], t.row_bytes(x.shape[-1]))
