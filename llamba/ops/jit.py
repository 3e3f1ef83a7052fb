"""The one place that sets Numba policy: caching and fast-math flags (threads: see threads.py).

Fast-math is on for reassociation and contraction (what lets loops vectorize) but without `nnan`/`ninf`:
attention masks are -inf and must survive arithmetic.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
# The batch kernels must compute each output the same way whatever the batch size. Without `reassoc` LLVM keeps
# each sum in source order, and without `contract` it fuses no multiply-add on its own (where it would, it
# decides by context, so two loops with the same expression could round differently): the kernels call `fma`
# where they mean one. They still vectorize across the lanes.
EXACT_FASTMATH = FASTMATH - {"reassoc", "contract"}


def kernel(fn=None, *, parallel: bool = False, inline: bool = False):
    """njit with the project's policy: cached on disk, fast-math as above, no Python objects. inline: a helper
    Numba inlines into the kernels that call it (one definition of arithmetic several kernels share)."""

    def wrap(f):
        return numba.njit(cache=True, fastmath=set(FASTMATH), parallel=parallel, nogil=True,
                          inline="always" if inline else "never")(f)

    return wrap(fn) if fn is not None else wrap


def exact_kernel(fn=None, *, parallel: bool = False, inline: bool = False, ieee_division: bool = False):
    """A kernel without reassociation or implicit contraction: its arithmetic is fixed by the source, so every
    token in a batch gets the same operations in the same order (the batch invariance the decoders and the
    server rely on). inline: a helper inlined into its caller by Numba (LLVM will not inline a large one, and
    a call per block then costs more than its work). ieee_division: x / 0 is inf or NaN, as in NumPy, instead
    of Python's ZeroDivisionError, whose check in every division of a loop stops it vectorizing."""

    def wrap(f):
        return numba.njit(cache=True, fastmath=set(EXACT_FASTMATH), parallel=parallel, nogil=True,
                          inline="always" if inline else "never",
                          error_model="numpy" if ieee_division else "python")(f)

    return wrap(fn) if fn is not None else wrap


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: weights from the mmap are read-only, and Numba compiles a separate variant for
    writable arrays, so everything that feeds a weight kernel goes through here to keep one variant."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


def kernels_compiled() -> bool:
    """Whether Numba's on-disk cache already holds compiled kernels (so start-up will not compile)."""
    from pathlib import Path

    cache_dir = Path(__file__).parent / "__pycache__"
    return cache_dir.is_dir() and any(cache_dir.glob("matmul.batch_int8-*.nbi"))


@intrinsic
def bitcast_f32(typingctx, bits):
    """Reinterpret a uint32's bits as a float32 (Numba has no scalar view)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def bitcast_u32(typingctx, value):
    """Reinterpret a float32's bits as a uint32."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return sig, codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma.f32): the same result wherever it is called, and it vectorizes."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = context.get_value_type(types.float32)
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504), np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)  # exp(-87) ~ 1.6e-38, the smallest normal float32's neighbourhood: below is ~0
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@numba.njit(inline="always", cache=True)
def softmax_exp(x):
    """exp(x) for x <= 0 (softmax's shifted scores) within 3 ulp, as arithmetic that vectorizes: Numba
    calls libm's scalar expf per element, which made the exponentials most of decoding's attention time.
    Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial for exp(r), 2^n from the exponent
    bits. Below -87 it returns exp(-87) (about 1.6e-38, nothing against the largest score's 1); NaN stays NaN."""
    if x < _EXP_FLOOR:
        x = _EXP_FLOOR
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    p = p * r * r + r + np.float32(1.0)
    return p * bitcast_f32(np.uint32(np.int32(n) + 127) << np.uint32(23))


_F16_EXPONENT_SHIFT = np.float32(2.0**112)  # moves an f16 exponent, placed in an f32, to its f32 value


@numba.njit(inline="always", cache=True)
def f16_bits_to_f32(h):
    """float16 bits -> float32, exact for every finite value (subnormals too); vectorizes, unlike a table."""
    h32 = np.uint32(h)
    bits = ((h32 & np.uint32(0x8000)) << np.uint32(16)) | ((h32 & np.uint32(0x7FFF)) << np.uint32(13))
    return bitcast_f32(bits) * _F16_EXPONENT_SHIFT


_F16_DENORM_MAGIC = np.uint32(126 << 23)  # 0.5: adding it lines a tiny float's bits up as an f16 subnormal's


@numba.njit(inline="always", cache=True)
def f32_to_f16_bits(f):
    """float32 -> float16 bits, rounded to nearest even as NumPy's astype(float16) and ggml's FP32_TO_FP16
    (overflow to inf, subnormals, NaN kept); F. Giesen's float_to_half_fast3_rtne."""
    x = bitcast_u32(np.float32(f))
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    x &= np.uint32(0x7FFFFFFF)
    if x >= np.uint32(0x47800000):  # 65536 and beyond (those from 65520 round up here too): inf, or NaN
        h = np.uint32(0x7E00) if x > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif x < np.uint32(0x38800000):  # below 2^-14: an f16 subnormal, rounded by the float addition itself
        h = bitcast_u32(bitcast_f32(x) + bitcast_f32(_F16_DENORM_MAGIC)) - _F16_DENORM_MAGIC
    else:
        odd = (x >> np.uint32(13)) & np.uint32(1)
        h = (x + np.uint32(((15 - 127) << 23) & 0xFFFFFFFF) + np.uint32(0xFFF) + odd) >> np.uint32(13)
    return np.uint16(sign | h)


def as_f32(x):
    """A weight scale as float32, whether stored as float32 or as float16 bits (uint16)."""
    return np.float32(x)


@overload(as_f32, inline="always")
def _as_f32_overload(x):
    if isinstance(x, types.Integer):
        return lambda x: f16_bits_to_f32(x)
    return lambda x: np.float32(x)


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages are dropped, re-read if touched)


def release_compiler_pages() -> None:
    """Page out LLVM's machine code once every kernel is loaded.

    libllvmlite is about 70 MB of code that only compiling and linking kernels runs; once the kernels are in
    memory, calling them never touches it. Its pages are clean and file-backed, so the kernel drops them
    (what it would do under memory pressure anyway) and reads them back should a new kernel ever compile.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/maps") as maps:
            regions = [line.split()[0] for line in maps if "llvmlite" in line]
    except OSError:  # not Linux/glibc: nothing to do
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for region in regions:
        start, stop = (int(bound, 16) for bound in region.split("-"))
        libc.madvise(start, stop - start, _MADV_PAGEOUT)  # a hint: an old kernel's EINVAL changes nothing
