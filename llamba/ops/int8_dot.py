"""Integer dot products of 8-bit activations with quantized weights: the one primitive the weight kernels use.

A weight block of a chunk (CHUNK rows x `group` columns) is stored as quads: for each run of 4 columns, every
row's 4 codes side by side, so 16 rows' quads fill one 64-byte vector. One `vpdpbusd` (AVX-512 VNNI) then
multiplies 16 rows x 4 columns of unsigned codes by 4 signed activation bytes broadcast to every lane, adding
the sums of 4 into 16 int32 lanes: 64 multiply-adds per instruction, four times the float32 FMA's 16.

Numba cannot reach that instruction, so `chunk_product_*` are intrinsics that emit the LLVM IR of a whole
chunk for up to NT tokens: a loop over the blocks whose integer sums and float accumulators (one per token and
row vector) all stay in registers, each block's sums scaled into the floats as the loop goes (a K-quant's
sums first add up in integers over its super-block, times their integer sub-block scales). (One call per
block, with the sums and accumulators going through memory, ran at a third of this speed.) Where the CPU lacks
VNNI they emit the same sums as plain integer vector arithmetic (LLVM picks the best instructions it has): the
results are the same integers. Integer sums are exact and each token's float arithmetic is the same whatever
tokens share a call: the batch invariance the decoders and the server rely on.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .repack import CHUNK, SUPER, layout_variants

HAS_VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))
NT = 4  # tokens per call: NT x ROW_VECTORS integer sums and as many float accumulators, plus the unpacked
#        weights and scales, fill AVX-512's 32 registers
ROW_VECTORS = CHUNK // 16  # a chunk's rows are vectors of 16 int32 lanes
QUAD_BYTES = 4 * CHUNK  # one quad of a chunk: every row's 4 codes

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_BYTES, _LANES, _FLOATS = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def _dot4(builder, acc, w, x):
    """acc + the per-lane sums of 4 unsigned bytes of w times 4 signed bytes of x."""
    if HAS_VNNI:
        fn = builder.module.declare_intrinsic(
            "llvm.x86.avx512.vpdpbusd.512", (), ir.FunctionType(_LANES, [_LANES, _BYTES, _BYTES]))
        return builder.call(fn, [acc, w, x])
    wide = ir.VectorType(_I32, 64)
    products = builder.mul(builder.zext(w, wide), builder.sext(x, wide))
    for m in range(4):
        pick = ir.Constant(_LANES, [4 * i + m for i in range(16)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, pick))
    return acc


def _broadcast(builder, word):
    """An int32 (4 activation bytes) in every lane, as 64 bytes."""
    return builder.bitcast(_splat(builder, word, _LANES), _BYTES)


def _bytes(value: int):
    return ir.Constant(_BYTES, [value] * 64)


def _fifth_bit(builder, high, bit: int):
    """Bit `bit` of each byte of the high-bit quad, moved to bit 4 (value 16), the fifth bit of a code."""
    moved = builder.shl(high, _bytes(4 - bit)) if bit <= 4 else builder.lshr(high, _bytes(bit - 4))
    return builder.and_(moved, _bytes(16))


def _splat(builder, scalar, vector_type):
    """A scalar in all 16 lanes."""
    v = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vector_type, ir.Undefined), ir.Constant(_LANES, [0] * 16))


def _fma(builder, a, b, c):
    """a * b + c with one rounding, lane by lane."""
    fn = builder.module.declare_intrinsic("llvm.fma.v16f32", (), ir.FunctionType(_FLOATS, [_FLOATS] * 3))
    return builder.call(fn, [a, b, c])


def _load_quad(builder, codes_ptr, q: int, v: int):
    """Quad q of a block for row vector v: 16 rows x 4 code bytes."""
    at = builder.gep(codes_ptr, [ir.Constant(_I64, q * QUAD_BYTES + v * 64)])
    return builder.load(builder.bitcast(at, _BYTES.as_pointer()), align=1)


class _Layout:
    """How a block's codes sit: n_quads quads of code bytes, as nibbles (two codes a byte) or not, with or
    without a fifth quad of top bits; group columns per block."""

    def __init__(self, n_quads: int, nibbles: bool, high_bits: bool = False):
        self.n_quads, self.nibbles, self.high_bits = n_quads, nibbles, high_bits
        self.group = 8 * n_quads if nibbles else 4 * n_quads
        self.block_bytes = (n_quads + high_bits) * QUAD_BYTES

    def weights(self, builder, codes_ptr, v: int) -> list:
        """Row vector v's weights of one block as (16 rows x 4 codes, activation word) pairs."""
        load = lambda q: _load_quad(builder, codes_ptr, q, v)
        high = load(self.n_quads) if self.high_bits else None
        pairs = []
        for q in range(self.n_quads):
            w = load(q)
            if not self.nibbles:
                pairs.append((w, q))
                continue
            low, top = builder.and_(w, _bytes(15)), builder.lshr(w, _bytes(4))
            if high is not None:
                low = builder.or_(low, _fifth_bit(builder, high, 2 * q))
                top = builder.or_(top, _fifth_bit(builder, high, 2 * q + 1))
            pairs += [(low, q), (top, q + 4)]
        return pairs


class _SixBitLayout(_Layout):
    """repack's u6: 16 6-bit codes in 3 quads, each byte a code in bits 0-5 and two bits of one of the last
    four codes in bits 6-7."""

    def __init__(self):
        super().__init__(3, False)
        self.group = 16

    def weights(self, builder, codes_ptr, v: int) -> list:
        quads = [_load_quad(builder, codes_ptr, q, v) for q in range(3)]
        pairs = [(builder.and_(w, _bytes(63)), q) for q, w in enumerate(quads)]
        last = builder.lshr(quads[0], _bytes(6))
        for p, w in enumerate(quads[1:], 1):  # bits 2p, 2p + 1 of the last codes, from bits 6-7 of quad p
            last = builder.or_(last, builder.and_(builder.lshr(w, _bytes(6 - 2 * p)), _bytes(3 << (2 * p))))
        return pairs + [(last, 3)]


class _Args:
    """The chunk kernel's arguments as LLVM values (pointers already advanced to this chunk and token group)."""

    def __init__(self, context, builder, signature, args):
        data = lambda i: context.make_array(signature.args[i])(context, builder, args[i]).data
        (_, _, codes_at, _, words_at, self.row_words, _, scale_at, _, _, supers_at, _, _, xs_at, code_bias,
         self.n_blocks, self.n_tokens, self.has_offset) = args
        self.acc = data(0)
        self.codes = builder.gep(data(1), [codes_at])
        self.words = builder.gep(data(3), [words_at])
        self.scale = builder.gep(data(6), [scale_at])
        self.offset = builder.gep(data(8), [scale_at])
        self.supers = builder.gep(data(9), [supers_at])
        self.scale_type = signature.args[6].dtype  # uint16: float16 bits; uint8 / int8: sub-block scales
        self.x_scales = builder.gep(data(11), [xs_at])
        self.x_code_sums = builder.gep(data(12), [xs_at])
        self.code_bias = builder.trunc(code_bias, _I32)


def _load_halves(builder, ptr, at):
    """16 float16 numbers (as their bits) from ptr + at, as float32 (exact)."""
    kind = ir.VectorType(ir.HalfType(), 16)
    return builder.fpext(builder.load(builder.bitcast(builder.gep(ptr, [at]), kind.as_pointer()), align=2), _FLOATS)


def _block_scales(builder, a: "_Args", b, v: int, offsets: bool):
    """Row vector v's float16 scales and offsets (None without) of block b, as float32."""
    at = builder.add(builder.mul(b, ir.Constant(_I64, CHUNK)), ir.Constant(_I64, 16 * v))
    return _load_halves(builder, a.scale, at), _load_halves(builder, a.offset, at) if offsets else None


def _emit_chunk(builder, a: _Args, layout: _Layout, n_tokens: int, offsets: bool):
    """The chunk for n_tokens tokens: a loop over blocks with one float accumulator per token and row vector
    in a register, each block's integer sums scaled into it; then the accumulators stored to a.acc."""
    if a.scale_type != types.uint16:
        _emit_super_chunk(builder, a, layout, n_tokens, offsets)
        return
    entry = builder.block
    loop = builder.function.append_basic_block("chunk.blocks")
    done = builder.function.append_basic_block("chunk.stored")
    builder.branch(loop)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    b.add_incoming(ir.Constant(_I64, 0), entry)
    acc = _phis(builder, _FLOATS, n_tokens, ir.Constant(_FLOATS, [0.0] * 16), entry)
    tokens = [_Token(builder, a, b, t) for t in range(n_tokens)]
    sums = _block_sums(builder, a, layout, b, tokens)
    new = _scaled_into(builder, a, layout, b, tokens, sums, acc, offsets)
    b_next = builder.add(b, ir.Constant(_I64, 1))
    b.add_incoming(b_next, builder.block)
    _add_incoming(acc, new, builder.block)
    builder.cbranch(builder.icmp_signed("<", b_next, a.n_blocks), loop, done)
    builder.position_at_end(done)
    _store_accumulators(builder, a, new)


def _emit_super_chunk(builder, a: _Args, layout: _Layout, n_tokens: int, offsets: bool):
    """The chunk of a K-quant, whose activations have one scale per super-block (as llama.cpp's q8_K): per
    super-block, each sub-block's integer sums times its integer scale (and its code sum times its integer
    min) add up in int32 lanes, exactly; only then are they scaled into the float accumulators, by d dx (and
    -dmin dx). Per sub-block that is an integer multiply-add where a per-block activation scale needs float
    scales, conversions and fmas: the K-quants' decode spent some 40% of its instructions there."""
    per_super = ir.Constant(_I64, SUPER // layout.group)
    fn = builder.function
    entry, outer, inner = builder.block, fn.append_basic_block("chunk.supers"), fn.append_basic_block("chunk.subs")
    latch, done = fn.append_basic_block("chunk.super_done"), fn.append_basic_block("chunk.stored")
    zeros, int_zeros = ir.Constant(_FLOATS, [0.0] * 16), ir.Constant(_LANES, [0] * 16)
    builder.branch(outer)

    builder.position_at_end(outer)
    s = builder.phi(_I64)
    s.add_incoming(ir.Constant(_I64, 0), entry)
    acc = _phis(builder, _FLOATS, n_tokens, zeros, entry)
    builder.branch(inner)

    builder.position_at_end(inner)
    j = builder.phi(_I64)
    j.add_incoming(ir.Constant(_I64, 0), outer)
    scaled = _phis(builder, _LANES, n_tokens, int_zeros, outer)
    mins = _phis(builder, _LANES, n_tokens, int_zeros, outer) if offsets else None
    b = builder.add(builder.mul(s, per_super), j)
    tokens = [_Token(builder, a, b, t) for t in range(n_tokens)]
    sums = _block_sums(builder, a, layout, b, tokens)
    at = builder.mul(b, ir.Constant(_I64, CHUNK))
    signed = a.scale_type == types.int8
    lanes = lambda ptr, v: _load_small_lanes(builder, ptr, builder.add(at, ir.Constant(_I64, 16 * v)), signed)
    sc = [lanes(a.scale, v) for v in range(ROW_VECTORS)]
    new_scaled = [[builder.add(scaled[t][v], builder.mul(sums[t][v], sc[v])) for v in range(ROW_VECTORS)]
                  for t in range(n_tokens)]
    if offsets:
        mn = [lanes(a.offset, v) for v in range(ROW_VECTORS)]
        new_mins = [[builder.add(mins[t][v], builder.mul(mn[v], tokens[t].code_sum)) for v in range(ROW_VECTORS)]
                    for t in range(n_tokens)]
    j_next = builder.add(j, ir.Constant(_I64, 1))
    j.add_incoming(j_next, builder.block)
    _add_incoming(scaled, new_scaled, builder.block)
    if offsets:
        _add_incoming(mins, new_mins, builder.block)
    builder.cbranch(builder.icmp_signed("<", j_next, per_super), inner, latch)

    builder.position_at_end(latch)
    first = builder.mul(s, per_super)
    fields = 1 + offsets  # d (and dmin) per super-block and row
    new = []
    for t in range(n_tokens):
        dx = _splat(builder, builder.load(builder.gep(a.x_scales, [
            builder.add(builder.mul(a.n_blocks, ir.Constant(_I64, t)), first)])), _FLOATS)
        row = []
        for v in range(ROW_VECTORS):
            d_at = builder.add(builder.mul(s, ir.Constant(_I64, fields * CHUNK)), ir.Constant(_I64, 16 * v))
            d = _load_halves(builder, a.supers, d_at)
            value = _fma(builder, builder.fmul(d, dx), builder.sitofp(new_scaled[t][v], _FLOATS), acc[t][v])
            if offsets:
                dmin = _load_halves(builder, a.supers, builder.add(d_at, ir.Constant(_I64, CHUNK)))
                minus_dmin_dx = builder.fneg(builder.fmul(dmin, dx))
                value = _fma(builder, minus_dmin_dx, builder.sitofp(new_mins[t][v], _FLOATS), value)
            row.append(value)
        new.append(row)
    s_next = builder.add(s, ir.Constant(_I64, 1))
    s.add_incoming(s_next, builder.block)
    _add_incoming(acc, new, builder.block)
    n_supers = builder.udiv(a.n_blocks, per_super)
    builder.cbranch(builder.icmp_signed("<", s_next, n_supers), outer, done)

    builder.position_at_end(done)
    _store_accumulators(builder, a, new)


def _phis(builder, kind, n_tokens: int, start, start_block) -> list:
    """A phi per token and row vector, entered with `start` from start_block."""
    phis = [[builder.phi(kind) for _ in range(ROW_VECTORS)] for _ in range(n_tokens)]
    for p in (p for row in phis for p in row):
        p.add_incoming(start, start_block)
    return phis


def _add_incoming(phis: list, values: list, block) -> None:
    for row, value_row in zip(phis, values):
        for p, value in zip(row, value_row):
            p.add_incoming(value, block)


def _store_accumulators(builder, a: _Args, acc: list) -> None:
    for t, row in enumerate(acc):
        for v, value in enumerate(row):
            at = builder.gep(a.acc, [ir.Constant(_I64, (t * ROW_VECTORS + v) * 16)])
            builder.store(value, builder.bitcast(at, _FLOATS.as_pointer()), align=4)


def _load_small_lanes(builder, ptr, at, signed: bool):
    """16 bytes from ptr + at (sub-block scales or mins), as int32 lanes."""
    kind = ir.VectorType(_I8, 16)
    v = builder.load(builder.bitcast(builder.gep(ptr, [at]), kind.as_pointer()), align=1)
    return builder.sext(v, _LANES) if signed else builder.zext(v, _LANES)


def _block_sums(builder, a: _Args, layout: _Layout, b, tokens: list) -> list:
    """Block b's integer dot products minus the code bias's share, bias * sum c, per [token][row vector] in
    16 int32 lanes. (Starting each sum from -bias * sum c instead of zero saves a subtraction per sum.)"""
    codes = builder.gep(a.codes, [builder.mul(b, ir.Constant(_I64, layout.block_bytes))])
    if len(tokens) > 1:  # one token is a plain stream the hardware prefetcher keeps up with (extra hints cost)
        _prefetch_next_chunk(builder, a, layout, codes)
    words = builder.gep(a.words, [builder.mul(b, ir.Constant(_I64, layout.group // 4))])
    sums = [[token.minus_bias] * ROW_VECTORS for token in tokens]
    for v in range(ROW_VECTORS):
        for w, xi in layout.weights(builder, codes, v):
            for t in range(len(tokens)):
                at = builder.add(builder.mul(a.row_words, ir.Constant(_I64, t)), ir.Constant(_I64, xi))
                sums[t][v] = _dot4(builder, sums[t][v], w, _broadcast(builder, builder.load(builder.gep(words, [at]))))
    return sums


def _prefetch_next_chunk(builder, a: _Args, layout: _Layout, codes) -> None:
    """Ask for the same block of the next chunk (into L2): a batch of guesses computes long enough per chunk
    that the hardware prefetcher alone leaves memory idle meanwhile."""
    fn = builder.module.declare_intrinsic("llvm.prefetch", [_I8.as_pointer()],
                                          ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32]))
    ahead = builder.mul(a.n_blocks, ir.Constant(_I64, layout.block_bytes))
    for line in range(0, layout.block_bytes, 64):
        at = builder.gep(codes, [builder.add(ahead, ir.Constant(_I64, line))])
        builder.call(fn, [at, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


class _Token:
    """A token's terms for block b: its activation scale dx (splat), dx * sum c (splat, for the offsets) and
    -bias * sum c (splat), with sum c the block's activation codes' sum."""

    def __init__(self, builder, a: _Args, b, t: int):
        i = builder.add(builder.mul(a.n_blocks, ir.Constant(_I64, t)), b)
        dx = builder.load(builder.gep(a.x_scales, [i]))
        code_sum = builder.load(builder.gep(a.x_code_sums, [i]))
        self.minus_bias = _splat(builder, builder.mul(builder.neg(a.code_bias), code_sum), _LANES)
        self.code_sum = _splat(builder, code_sum, _LANES)
        self.dx = _splat(builder, dx, _FLOATS)
        self.dx_sum = _splat(builder, builder.fmul(dx, builder.sitofp(code_sum, _F32)), _FLOATS)


def _scaled_into(builder, a: _Args, layout: _Layout, b, tokens: list, sums: list, acc: list, offsets: bool) -> list:
    """acc + block b's sums scaled: fma(o, dx sum c, fma(s dx, sum q c - bias sum c, acc)), per token and row
    vector, the same operations whatever the token count."""
    scales, offs = zip(*(_block_scales(builder, a, b, v, offsets) for v in range(ROW_VECTORS)))
    new = []
    for token, token_sums, token_acc in zip(tokens, sums, acc):
        row = []
        for v in range(ROW_VECTORS):
            exact = builder.sitofp(token_sums[v], _FLOATS)
            value = _fma(builder, builder.fmul(scales[v], token.dx), exact, token_acc[v])
            row.append(_fma(builder, offs[v], token.dx_sum, value) if offsets else value)
        new.append(row)
    return new


def _chunk_product(layout: _Layout, name: str):
    """An intrinsic chunk_product(acc, codes, codes_at, words, words_at, row_words, scale, scale_at, offset,
    supers, supers_at, x_scales, x_code_sums, xs_at, code_bias, n_blocks, n_tokens, has_offset):
    acc [NT * CHUNK] float32 <- one chunk's rows times n_tokens (1..NT) tokens' activations, summed over
    all n_blocks blocks: per block, integer dot products scaled by the block's weight and activation scales,
    sum_k (s (q_k - bias) + o) dx c_k = s dx (sum_k q_k c_k - bias sum_k c_k) + o dx sum_k c_k,
    with float accumulators kept in registers across the blocks. Bodies are emitted only for the scale
    types (and with offsets or not) some block type of the layout `name` has: the others would only cost
    compile time."""
    variants = layout_variants(name)

    @intrinsic
    def chunk_product(typingctx, acc, codes, codes_at, words, words_at, row_words, scale, scale_at, offset,
                      supers, supers_at, x_scales, x_code_sums, xs_at, code_bias, n_blocks, n_tokens, has_offset):
        i64 = types.int64
        sig = types.void(acc, codes, i64, words, i64, i64, scale, i64, offset, supers, i64, x_scales,
                         x_code_sums, i64, i64, i64, i64, types.boolean)

        def codegen(context, builder, signature, args):
            a = _Args(context, builder, signature, args)
            done = builder.function.append_basic_block("chunk.done")
            with_offsets = builder.function.append_basic_block("chunk.with_offsets")
            without = builder.function.append_basic_block("chunk.without_offsets")
            flag = builder.icmp_unsigned("!=", a.has_offset, ir.Constant(a.has_offset.type, 0))
            builder.cbranch(flag, with_offsets, without)
            scale_type = str(a.scale_type)
            for offsets, start in ((True, with_offsets), (False, without)):
                builder.position_at_end(start)
                if (scale_type, offsets) not in variants:
                    builder.branch(done)  # no block type has this: nothing to compile
                    continue
                cases = builder.switch(a.n_tokens, done)
                for k in range(1, NT + 1):  # one body per token count: registers, no inner loops
                    body = builder.function.append_basic_block(f"chunk.tokens{k}")
                    cases.add_case(ir.Constant(_I64, k), body)
                    builder.position_at_end(body)
                    _emit_chunk(builder, a, layout, k, offsets)
                    builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return chunk_product


# One per layout of repack.LAYOUTS.
chunk_product_u4 = _chunk_product(_Layout(4, True), "u4")  # 32 4-bit codes: Q4_0, Q4_1, Q4_K
chunk_product_u5 = _chunk_product(_Layout(4, True, True), "u5")  # 32 5-bit codes: Q5_0, Q5_1, Q5_K
chunk_product_u6 = _chunk_product(_SixBitLayout(), "u6")  # 16 6-bit codes: Q6_K
chunk_product_q8_32 = _chunk_product(_Layout(8, False), "q8_32")  # 32 byte codes: Q8_0
chunk_product_q8_16 = _chunk_product(_Layout(4, False), "q8_16")  # 16 byte codes: Q2_K, Q3_K
