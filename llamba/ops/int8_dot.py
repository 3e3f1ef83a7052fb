"""Integer dot products of 8-bit activations with quantized weights: the one primitive the weight kernels use.

A weight block of a chunk (CHUNK rows x `group` columns) is stored as quads: for each run of 4 columns, every
row's 4 codes side by side, so 16 rows' quads fill one 64-byte vector. One `vpdpbusd` (AVX-512 VNNI) then
multiplies 16 rows x 4 columns of unsigned codes by 4 signed activation bytes broadcast to every lane, adding
the sums of 4 into 16 int32 lanes: 64 multiply-adds per instruction, four times the float32 FMA's 16.

Numba cannot reach that instruction, so `block_dots_*` are intrinsics that emit the LLVM IR of one block for up
to NT tokens, with every accumulator in a register. Where the CPU lacks VNNI they emit the same sums as plain
integer vector arithmetic (LLVM picks the best instructions it has): the results are the same integers.
Integer sums are exact, so whatever tokens share a call, each token's sums are the same: the batch invariance
the decoders and the server rely on comes for free.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

HAS_VNNI = bool(llvm.get_host_cpu_features().get("avx512vnni", False))
NT = 4  # tokens per call: 4 tokens x 4 row vectors of int32 sums, plus the unpacked weights, fill the registers
ROW_VECTORS = 4  # a chunk's 64 rows are 4 vectors of 16 int32 lanes
QUAD_BYTES = 256  # one quad of a chunk: 64 rows x 4 codes

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_BYTES, _LANES = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)


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
    v = builder.insert_element(ir.Constant(_LANES, ir.Undefined), word, ir.Constant(_I32, 0))
    v = builder.shuffle_vector(v, ir.Constant(_LANES, ir.Undefined), ir.Constant(_LANES, [0] * 16))
    return builder.bitcast(v, _BYTES)


def _bytes(value: int):
    return ir.Constant(_BYTES, [value] * 64)


def _load_quad(builder, codes_ptr, q: int) -> list:
    """Quad q of a block: ROW_VECTORS vectors of 16 rows x 4 code bytes."""
    words = []
    for v in range(ROW_VECTORS):
        at = builder.gep(codes_ptr, [ir.Constant(_I64, q * QUAD_BYTES + v * 64)])
        words.append(builder.load(builder.bitcast(at, _BYTES.as_pointer()), align=1))
    return words


def _fifth_bit(builder, high, bit: int):
    """Bit `bit` of each byte of the high-bit quad, moved to bit 4 (value 16), the fifth bit of a code."""
    moved = builder.shl(high, _bytes(4 - bit)) if bit <= 4 else builder.lshr(high, _bytes(bit - 4))
    return builder.and_(moved, _bytes(16))


def _emit_block(builder, sums_ptr, codes_ptr, x_ptr, x_row, n_tokens: int, n_quads: int, nibbles: bool,
                high_bits: bool):
    """Straight-line IR: sums[t, r] = the block's integer dot product of row r with token t's activations.

    nibbles: each code byte holds two 4-bit codes, columns j (low) and j + 16 (high) of a 32-column block,
    so quad q's low nibbles meet activation word q and its high nibbles word q + 4.
    high_bits: 5-bit codes; a fifth quad after the nibbles holds their top bits, byte m of a row with bit 2q
    for column 4q + m and bit 2q + 1 for column 4q + m + 16."""
    zero = ir.Constant(_LANES, [0] * 16)
    acc = [[zero] * ROW_VECTORS for _ in range(n_tokens)]
    high = _load_quad(builder, codes_ptr, n_quads) if high_bits else None
    for q in range(n_quads):
        words = _load_quad(builder, codes_ptr, q)
        passes = [(words, q)]
        if nibbles:
            low = [builder.and_(w, _bytes(15)) for w in words]
            top = [builder.lshr(w, _bytes(4)) for w in words]
            if high_bits:
                low = [builder.or_(c, _fifth_bit(builder, h, 2 * q)) for c, h in zip(low, high)]
                top = [builder.or_(c, _fifth_bit(builder, h, 2 * q + 1)) for c, h in zip(top, high)]
            passes = [(low, q), (top, q + 4)]
        for w, xi in passes:
            for t in range(n_tokens):
                at = builder.add(builder.mul(x_row, ir.Constant(_I64, t)), ir.Constant(_I64, xi))
                x = _broadcast(builder, builder.load(builder.gep(x_ptr, [at])))
                for v in range(ROW_VECTORS):
                    acc[t][v] = _dot4(builder, acc[t][v], w[v], x)
    for t in range(n_tokens):
        for v in range(ROW_VECTORS):
            at = builder.gep(sums_ptr, [ir.Constant(_I64, (t * ROW_VECTORS + v) * 16)])
            builder.store(acc[t][v], builder.bitcast(at, _LANES.as_pointer()), align=4)


def _block_dots(n_quads: int, nibbles: bool, high_bits: bool = False):
    """An intrinsic block_dots(sums, codes, codes_at, words, words_at, row_words, n_tokens) for one layout:
    sums [NT * 64] int32 <- one block of a chunk (codes flat uint8 from codes_at) times n_tokens (1..NT) tokens'
    activations (words flat int32: 4 bytes each, token t's block from words_at + t * row_words)."""

    @intrinsic
    def block_dots(typingctx, sums, codes, codes_at, words, words_at, row_words, n_tokens):
        sig = types.void(sums, codes, types.int64, words, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            sums_a, codes_a, codes_at, words_a, words_at, row_words, n = args
            array = lambda i, value: context.make_array(signature.args[i])(context, builder, value).data
            sums_ptr = array(0, sums_a)
            codes_ptr = builder.gep(array(1, codes_a), [codes_at])
            x_ptr = builder.gep(array(3, words_a), [words_at])
            done = builder.function.append_basic_block("block_dots.done")
            switch = builder.switch(n, done)
            for k in range(1, NT + 1):  # one straight-line body per token count: registers, no loops
                body = builder.function.append_basic_block(f"block_dots.tokens{k}")
                switch.add_case(ir.Constant(_I64, k), body)
                builder.position_at_end(body)
                _emit_block(builder, sums_ptr, codes_ptr, x_ptr, row_words, k, n_quads, nibbles, high_bits)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return block_dots


block_dots_u4 = _block_dots(4, nibbles=True)  # 32 columns of 4-bit codes
block_dots_u5 = _block_dots(4, nibbles=True, high_bits=True)  # 32 columns of 5-bit codes (Q5_0, Q5_1, Q5_K)
block_dots_q8_32 = _block_dots(8, nibbles=False)  # 32 columns of byte codes
block_dots_q8_16 = _block_dots(4, nibbles=False)  # 16 columns of byte codes (Q6_K, Q2_K, Q3_K)
