"""Matrix products over lanes-layout weights, for any number of tokens.

Quantized weights: each token's inputs are quantized to 8 bits with a scale per block (as llama.cpp's q8_0
does), or per super-block for the K-quants (as its q8_K), and integer dot products with the weight codes
(int8_dot, AVX-512 VNNI where the CPU has it) are scaled into float accumulators, one per row and token. The
same kernel serves one token, a tree of guesses, several sequences and a long prompt (64 tokens per call), so
a token's outputs never depend on what else is in the batch. Integer multiply-adds run at four times the float
rate, which is what makes verifying guesses cheap.

Float weights (F32, F16, BF16): an fma chain per row and token up to 64 tokens; beyond, a register-blocked
prefill loop (8 tokens x 2 rows per pass) over the chunk's float rows.
"""

from __future__ import annotations

import numba
import numpy as np

from .int8_dot import (NT, chunk_product_q8_16, chunk_product_q8_32, chunk_product_u4, chunk_product_u5,
                       chunk_product_u6)
from .jit import as_f32, bitcast_f32, exact_kernel, f16_bits_to_f32, fma, kernel
from .repack import CHUNK, SUPER, Q8_16, Q8_32, U4, U5, U6, LaneMatrix
from .threads import kernel_threads

SMALL_BATCH = 64  # tokens per kernel call: their accumulators stay in L1
PARALLEL_QUANTIZE = 8  # tokens from which the inputs are quantized in parallel (a parallel region costs microseconds)


@exact_kernel(parallel=True)
def quantize_activations(x, group, span):
    """Each token's inputs as int8 codes, round(x * 127 / max|x|) with the max taken over each `span` inputs
    (a block, as llama.cpp's q8_0, or a K-quant's super-block, as its q8_K), with per block of `group` inputs
    the scale max|x| / 127 and the codes' sum (for offsets and code biases). A token's codes depend on its
    inputs alone."""
    n_tokens, n_cols = x.shape
    codes = np.empty((n_tokens, n_cols), np.int8)
    scales = np.empty((n_tokens, n_cols // group), np.float32)
    code_sums = np.empty((n_tokens, n_cols // group), np.int32)
    if n_tokens >= PARALLEL_QUANTIZE:
        for t in numba.prange(n_tokens):
            _quantize_token(x[t], group, span, codes[t], scales[t], code_sums[t])
    else:
        for t in range(n_tokens):
            _quantize_token(x[t], group, span, codes[t], scales[t], code_sums[t])
    return codes, scales, code_sums


@exact_kernel
def _quantize_token(x, group, span, codes, scales, code_sums):
    """One token's inputs x [n_cols] into codes, scales and code sums. max|x| is taken on the float bits as
    integers (for non-negative floats their order is the bits' order), which vectorizes where a float max
    does not, and keeps a NaN (its bits are above infinity's) so the product is NaN and the model stops."""
    bits = x.view(np.int32)
    blocks_per_span = span // group
    for s in range(x.size // span):
        start = np.uint64(s * span)  # unsigned indices: no negative-index wrap-around, which stops SIMD
        top_bits = np.int32(0)
        for j in range(np.uint64(span)):
            top_bits = max(top_bits, bits[start + j] & np.int32(0x7FFFFFFF))
        top = bitcast_f32(np.uint32(top_bits))
        inverse = np.float32(127.0) / top if top > 0 else np.float32(0.0)
        for g in range(blocks_per_span):
            b = s * blocks_per_span + g
            at = np.uint64(b * group)
            code_sum = np.int32(0)
            for j in range(np.uint64(group)):
                q = np.int32(np.rint(x[at + j] * inverse))
                codes[at + j] = q
                code_sum += q
            scales[b], code_sums[b] = top / np.float32(127.0), code_sum


@exact_kernel
def _chunk_product(acc, codes, codes_at, words, words_at, row_words, scale, scale_at, offset, supers, supers_at,
                   x_scales, x_code_sums, xs_at, code_bias, n_blocks, n, layout):
    """int8_dot's chunk product for the weights' layout (its index in repack.LAYOUTS)."""
    args = (acc, codes, codes_at, words, words_at, row_words, scale, scale_at, offset, supers, supers_at, x_scales,
            x_code_sums, xs_at, code_bias, n_blocks, n, offset.size > 0)
    if layout == U4:
        chunk_product_u4(*args)
    elif layout == U5:
        chunk_product_u5(*args)
    elif layout == U6:
        chunk_product_u6(*args)
    elif layout == Q8_32:
        chunk_product_q8_32(*args)
    else:
        chunk_product_q8_16(*args)


@exact_kernel(parallel=True)
def batch_int8(out, codes, scale, offset, supers, code_bias, group, span, layout, x, n_threads):
    """out [n_tokens, n_rows] = x W^T for quantized weights, the inputs x quantized to 8 bits here (one call,
    not two: a call costs microseconds, and decoding makes over a hundred per token).

    Each thread takes an even share of the chunks of rows; per chunk, up to NT tokens at a time go through
    int8_dot's chunk product, which keeps a float accumulator per row and token in registers over all the
    blocks. Every token's arithmetic is the same whatever else is in the batch, so its outputs are
    bit-identical alone or in any batch."""
    x_codes, x_scales, x_code_sums = quantize_activations(x, group, span)
    words = x_codes.view(np.int32)  # 4 activation codes per int32
    n_tokens, row_words = words.shape
    n_chunks, n_blocks = codes.shape[0], codes.shape[1]
    flat_codes, flat_words = codes.reshape(-1), words.reshape(-1)
    flat_scale, flat_offset, flat_supers = scale.reshape(-1), offset.reshape(-1), supers.reshape(-1)
    super_stride = supers[0].size
    flat_x_scales, flat_x_sums = x_scales.reshape(-1), x_code_sums.reshape(-1)
    chunk_bytes = codes[0].size
    n_parts = min(n_threads, n_chunks)  # n_threads from the caller: numba.get_num_threads() here defeats caching
    for part in numba.prange(n_parts):
        acc = np.empty((NT, CHUNK), np.float32)
        for c in range(part * n_chunks // n_parts, (part + 1) * n_chunks // n_parts):
            t = 0
            while t < n_tokens:
                n = min(NT, n_tokens - t)
                _chunk_product(acc.reshape(-1), flat_codes, c * chunk_bytes, flat_words, t * row_words, row_words,
                               flat_scale, c * n_blocks * CHUNK, flat_offset, flat_supers, c * super_stride,
                               flat_x_scales, flat_x_sums, t * n_blocks, code_bias, n_blocks, n, layout)
                _store(out, c, t, n, acc)
                t += n


@exact_kernel
def _store(out, c, t0, n_tokens, acc):
    """Write tokens t0.. of a chunk's accumulators [n_tokens, CHUNK] to out, leaving out the padding rows."""
    lo = c * CHUNK
    n = min(CHUNK, out.shape[1] - lo)
    for t in range(n_tokens):
        for i in range(n):
            out[t0 + t, lo + i] = acc[t, i]


@exact_kernel(parallel=True)
def batch_f32(out, w, x):
    """out [n_tokens, n_rows] = x W^T for float lanes weights (w [n_chunks, n_cols, CHUNK]), one fma chain per
    row and token in input order."""
    n_tokens = x.shape[0]
    n_chunks, n_cols = w.shape[0], w.shape[1]
    for c in numba.prange(n_chunks):
        acc = np.zeros((n_tokens, CHUNK), np.float32)
        wc = w[c]
        for k in range(n_cols):
            wk = wc[k]
            for t in range(n_tokens):
                a, xv = acc[t], x[t, k]
                for i in range(CHUNK):
                    a[i] = fma(wk[i], xv, a[i])
        _store(out, c, 0, n_tokens, acc)


def matvec(out: np.ndarray, w: LaneMatrix, x: np.ndarray) -> np.ndarray:
    """out [n_rows] = W x for x [n_cols] float32: the one-token case of the batch kernels."""
    matmul(x.reshape(1, -1), w, out=out.reshape(1, -1))
    return out


def _batch_product(out: np.ndarray, w: LaneMatrix, x: np.ndarray) -> None:
    if w.kind == "f32":
        batch_f32(out, w.codes, x)
        return
    batch_int8(out, *w.int8_operands, x, kernel_threads())


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
def chunk_times_x(out, x, w, r0):
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
def matmul_f32(out, x, w):
    for c in numba.prange(w.shape[0]):
        chunk_times_x(out, x, np.ascontiguousarray(w[c].T), c * CHUNK)


def matmul(x: np.ndarray, w: LaneMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """[n_tokens, n_cols] -> [n_tokens, n_rows].

    Quantized weights: the integer kernel, SMALL_BATCH tokens per call. Its arithmetic per token does not
    depend on the other tokens (batch invariance: a token's outputs are bit-identical alone or in any batch,
    prompts included). Float weights: the batch kernel up to SMALL_BATCH tokens, else the prefill kernel.
    """
    n_tokens = x.shape[0]
    if out is None:
        out = np.empty((n_tokens, w.n_rows), np.float32)
    # decoding and guesses: one batch call, no copies or slices (they cost 1-2 us a call, and decoding makes
    # over a hundred calls per token)
    if n_tokens <= SMALL_BATCH and x.dtype == np.float32 and x.flags.c_contiguous and out.flags.c_contiguous:
        _batch_product(out, w, x)
        return out
    dense = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)  # one kernel variant
    x = np.ascontiguousarray(x, dtype=np.float32)
    if w.kind == "f32" and n_tokens > SMALL_BATCH:
        matmul_f32(dense, x, w.codes)
    else:
        for t in range(0, n_tokens, SMALL_BATCH):
            _batch_product(dense[t : t + SMALL_BATCH], w, x[t : t + SMALL_BATCH])
    if dense is not out:
        out[...] = dense
    return out


@kernel
def _block_scale(scale, offset, supers, c, b, i, group):
    """Block b's scale and offset for row i of chunk c: float16 numbers, or a K-quant's d * sc, -(dmin * mn)."""
    has_offset = offset.shape[1] > 0
    if supers.shape[1] == 0:
        return as_f32(scale[c, b, i]), as_f32(offset[c, b, i]) if has_offset else np.float32(0.0)
    sb = b // (SUPER // group)
    s = f16_bits_to_f32(supers[c, sb, 0, i]) * np.float32(scale[c, b, i])
    return s, -(f16_bits_to_f32(supers[c, sb, 1, i]) * np.float32(offset[c, b, i])) if has_offset else np.float32(0.0)


@kernel
def _code(codes, c, b, i, j, layout):
    """Code j of row i of chunk c's block b, for the layout (its index in repack.LAYOUTS)."""
    if layout == Q8_32 or layout == Q8_16:  # one code a byte
        return np.int32(codes[c, b, j >> 2, i, j & 3])
    if layout == U6:  # u6: bits 0-5 of byte j, or of the last four codes two bits from each of three bytes
        if j < 12:
            return np.int32(codes[c, b, j >> 2, i, j & 3]) & 63
        code = np.int32(0)
        for p in range(3):
            code |= (np.int32(codes[c, b, p, i, j - 12]) >> 6) << (2 * p)
        return code
    k, upper = j % 16, j // 16  # u4, u5: nibbles, and for u5 a fifth bit from the quad of top bits
    code = (np.int32(codes[c, b, k >> 2, i, k & 3]) >> (4 * upper)) & 15
    if layout == U5:
        code |= ((np.int32(codes[c, b, 4, i, k & 3]) >> (2 * (k >> 2) + upper)) & 1) << 4
    return code


@kernel
def _row(out, codes, scale, offset, supers, code_bias, group, layout, r):
    """Row r of quantized lanes weights as float32 (out [n_cols])."""
    c, i = r // CHUNK, r % CHUNK
    for b in range(codes.shape[1]):
        s, o = _block_scale(scale, offset, supers, c, b, i, group)
        for j in range(group):
            out[b * group + j] = s * np.float32(_code(codes, c, b, i, j, layout) - code_bias) + o


def gather_rows(w: LaneMatrix, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of W as float32 [len(rows), n_cols]: the embedding lookup."""
    out = np.empty((len(rows), w.n_cols), np.float32) if out is None else out
    for t, r in enumerate(rows):
        r = int(r)
        if w.kind != "f32":
            codes, scale, offset, supers, code_bias, group, _, layout = w.int8_operands
            _row(out[t], codes, scale, offset, supers, code_bias, group, layout, r)
        else:
            out[t] = w.codes[r // CHUNK, :, r % CHUNK]
    return out
