"""Every kernel against a NumPy reference, on random inputs, for each weight type."""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
import pytest

from llamba.errors import LlambaError
from llamba.formats.ggml_types import ggml_type
from llamba.formats.quants import dequantize
from llamba.ops import activations
from llamba.ops.attention import attention_chain, attention_listed
from llamba.ops.jit import softmax_exp
from llamba.ops.matmul import SMALL_BATCH, gather_rows, matmul, matvec
from llamba.ops.heads import split_heads
from llamba.ops.norm import NO_WEIGHT, add_block_output, all_finite, rmsnorm
from llamba.ops.repack import (CHUNK, SUPPORTED, WeightArena, lanes_nbytes, lanes_to_float, leading_rows, stack_lanes,
                               stack_runs, to_lanes)
from llamba.ops.rope import RopeConfig, rope_tables, rotate_head
from tests import reference
from tests.blocks import random_blocks

RNG = np.random.default_rng(2024)


def _random_matrix(type_name: str, n_rows: int, n_cols: int):
    """Raw GGUF-layout weights [n_rows, row_bytes] of a type, and their float values."""
    t = ggml_type(type_name)
    per_row = n_cols // t.block_elements if t.block_elements > 1 else n_cols // 64
    raw = random_blocks(type_name, RNG, n_rows * per_row).reshape(n_rows, -1)
    return raw, dequantize(raw, t)


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_repack_is_exact(type_name):
    raw, expected = _random_matrix(type_name, 100, 512)  # 100 rows: a partial last chunk
    lanes = to_lanes(raw, ggml_type(type_name), 512)
    assert np.array_equal(lanes_to_float(lanes), expected)


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_matvec_matmul_and_rows(type_name):
    """Quantized weights multiply the inputs rounded to 8 bits per block (float weights the inputs as they are):
    the result is that product up to float rounding, and within half a rounding step per input of the exact one."""
    n_cols = 1280
    raw, w = _random_matrix(type_name, 200, n_cols)
    lanes = to_lanes(raw, ggml_type(type_name), n_cols)
    x = RNG.standard_normal((SMALL_BATCH + 11, n_cols)).astype(np.float32)  # two calls: 64 tokens and 11
    seen = x if lanes.kind == "f32" else reference.int8_inputs(x, lanes.input_span)
    expected = seen.astype(np.float64) @ w.T.astype(np.float64)  # [75, 200]
    tol = 1e-5 * np.abs(w).max() * np.abs(x).max() * n_cols
    half_steps = np.abs(seen - x) @ np.abs(w.T)  # how far rounding the inputs can move each output
    out = np.empty(200, np.float32)
    assert np.abs(matvec(out, lanes, x[0]) - expected[0]).max() < tol
    assert np.abs(matmul(x, lanes) - expected).max() < tol  # more than one call's worth of tokens
    assert np.abs(matmul(x[:19], lanes) - expected[:19]).max() < tol
    assert (np.abs(matmul(x, lanes) - x.astype(np.float64) @ w.T) <= half_steps + tol).all()
    into = np.zeros((19, 300), np.float32)
    matmul(x[:19], lanes, out=into[:, 50:250])  # into a strided view, as the fused projections do
    assert np.abs(into[:, 50:250] - expected[:19]).max() < tol and not into[:, :50].any()
    rows = np.array([0, 199, 63, 64])
    assert np.array_equal(gather_rows(lanes, rows), w[rows])


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_leading_rows_are_the_first_rows_of_the_product(type_name):
    """A matrix's first rows (a draft's head of frequent tokens) give bit for bit the first outputs of the
    whole matrix, rounded up to whole chunks, sharing its memory."""
    raw, _ = _random_matrix(type_name, 136, 512)
    lanes = to_lanes(raw, ggml_type(type_name), 512)
    x = RNG.standard_normal((3, 512)).astype(np.float32)
    head = leading_rows(lanes, 40)
    assert head.n_rows == 2 * CHUNK and np.shares_memory(head.codes, lanes.codes)
    assert np.array_equal(matmul(x, head), matmul(x, lanes)[:, : 2 * CHUNK])
    assert leading_rows(lanes, 1000).n_rows == 136  # no more rows than the matrix has


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_batch_kernels_are_batch_invariant(type_name):
    """A token's outputs are bit-identical alone and as any row of a batch of 2, 3, 8, 17 or 64."""
    n_cols = 512
    raw, _ = _random_matrix(type_name, 136, n_cols)  # a partial last chunk
    lanes = to_lanes(raw, ggml_type(type_name), n_cols)
    x = RNG.standard_normal((SMALL_BATCH, n_cols)).astype(np.float32)
    alone = np.stack([matmul(x[t : t + 1], lanes)[0] for t in range(SMALL_BATCH)])
    for k in (1, 2, 3, 8, 17, 64):
        for start in (0, SMALL_BATCH - k):
            assert np.array_equal(matmul(x[start : start + k], lanes), alone[start : start + k]), (k, start)


def test_weights_in_one_arena_are_the_same_bytes():
    """Repacked into a WeightArena sized by lanes_nbytes, every matrix is the same bytes as on its own, and
    all of them live in the arena's one mapping."""
    types = ("Q4_1", "Q6_K", "Q8_0", "F16", "Q5_K")
    parts = [(_random_matrix(t, 100, 256)[0], ggml_type(t)) for t in types]
    arena = WeightArena(sum(lanes_nbytes(ggml, 100, 256) for _, ggml in parts))
    for data, ggml in parts:
        alone, placed = to_lanes(data, ggml, 256), to_lanes(data, ggml, 256, arena.zeros)
        for name in ("codes", "scale", "offset"):
            a, b = getattr(alone, name), getattr(placed, name)
            assert a.dtype == b.dtype and np.array_equal(a, b), (ggml.name, name)
            assert b.size == 0 or np.shares_memory(b, arena._buffer), (ggml.name, name)  # not NumPy's fallback


def test_an_arena_too_big_for_memory_is_a_clear_error():
    policy = Path("/proc/sys/vm/overcommit_memory")
    if not policy.exists() or policy.read_text().strip() != "0":  # Linux's heuristic refuses it outright
        pytest.skip("this kernel may grant any mapping")
    with pytest.raises(LlambaError, match="not enough memory for the model's weights"):
        WeightArena(1 << 50)


def test_stacking_only_where_layouts_agree():
    q4k_a, q4k_b = (_random_matrix("Q4_K", n, 256)[0] for n in (128, 64))
    q8 = _random_matrix("Q8_0", 64, 256)[0]
    odd, q4_0 = _random_matrix("Q4_0", 100, 256)[0], _random_matrix("Q4_0", 64, 256)[0]
    q6k, q6k_b, q3k = (_random_matrix(name, n, 256)[0] for name, n in (("Q6_K", 64), ("Q6_K", 32), ("Q3_K", 32)))
    part = lambda data, name: (data, ggml_type(name))  # noqa: E731
    fused = stack_lanes([part(q4k_a, "Q4_K"), part(q4k_b, "Q4_K")], 256)
    assert fused.n_rows == 192
    alone = [lanes_to_float(to_lanes(d, ggml_type("Q4_K"), 256)) for d in (q4k_a, q4k_b)]
    assert np.array_equal(lanes_to_float(fused), np.vstack(alone))
    runs = stack_runs([part(q4k_a, "Q4_K"), part(q4k_b, "Q4_K"), part(q8, "Q8_0"), part(q4_0, "Q4_0"),
                       part(odd, "Q4_0"), part(q6k, "Q6_K"), part(q6k_b, "Q6_K"), part(q3k, "Q3_K")])
    # Q4_K then Q8_0: other layouts; Q4_0's 100 rows do not fill their last chunk; Q6_K's 6-bit codes are not
    # Q3_K's bytes
    assert [len(run) for run in runs] == [2, 1, 1, 1, 2, 1]
    # Q4_K and Q4_0 are both 4-bit codes, but with other code biases and scale types: never one matrix
    assert [len(run) for run in stack_runs([part(q4k_b, "Q4_K"), part(q4_0, "Q4_0")])] == [1, 1]
    stacked = stack_lanes(runs[-2], 256)
    assert np.array_equal(lanes_to_float(stacked), np.vstack([dequantize(q6k, ggml_type("Q6_K")),
                                                               dequantize(q6k_b, ggml_type("Q6_K"))]))


def test_rmsnorm():
    x = RNG.standard_normal((5, 96)).astype(np.float32)
    w = RNG.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm(out, x, w, 1e-6)
    np.testing.assert_allclose(out, reference.rmsnorm(x.astype(np.float64), w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("post_norm", [False, True])
def test_add_block_output_joins_the_stream_and_norms_it_for_the_next_block(post_norm):
    x = RNG.standard_normal((4, 96)).astype(np.float32)
    out = RNG.standard_normal((4, 96)).astype(np.float32)
    post, following = (RNG.standard_normal(96).astype(np.float32) for _ in range(2))
    joined = x + (reference.rmsnorm(out.astype(np.float64), post, 1e-6) if post_norm else out)
    next_in = np.empty_like(x)
    assert add_block_output(x, out, post if post_norm else NO_WEIGHT, following, next_in, 1e-6)
    np.testing.assert_allclose(x, joined, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(next_in, reference.rmsnorm(joined, following, 1e-6), rtol=1e-5, atol=1e-5)
    out[2, 7] = np.inf
    assert not add_block_output(x, out, NO_WEIGHT, following, next_in, 1e-6)


@pytest.mark.parametrize("bias, qk_norm, neox", [(False, False, False), (True, False, True), (False, True, True)])
def test_split_heads_against_numpy(bias, qk_norm, neox):
    n, n_head, n_head_kv, head_dim, n_rot = 3, 4, 2, 64, 32
    qkv = RNG.standard_normal((n, (n_head + 2 * n_head_kv) * head_dim)).astype(np.float32)
    b = RNG.standard_normal(qkv.shape[1]).astype(np.float32) if bias else NO_WEIGHT
    q_norm, k_norm = (RNG.standard_normal(head_dim).astype(np.float32) if qk_norm else NO_WEIGHT for _ in range(2))
    pos = np.arange(7, 7 + n)
    cos, sin = rope_tables(pos, RopeConfig(n_rot=n_rot, base=10000.0, neox=neox))
    expected = qkv.astype(np.float64) + (b if bias else 0)
    q, k, v = (np.empty((n, heads, head_dim), np.float32) for heads in (n_head, n_head_kv, n_head_kv))
    split_heads(qkv, b, q_norm, k_norm, 1e-6, cos, sin, neox, q, k, v)
    q_ref, k_ref, v_ref = np.split(expected, [n_head * head_dim, (n_head + n_head_kv) * head_dim], axis=1)
    for ours, theirs, heads, norm in ((q, q_ref, n_head, q_norm), (k, k_ref, n_head_kv, k_norm)):
        theirs = theirs.reshape(n, heads, head_dim)
        if qk_norm:
            theirs = reference.rmsnorm(theirs, norm, 1e-6)
        np.testing.assert_allclose(ours, reference.rope(theirs, pos.astype(np.float64), n_rot, 10000.0, neox),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v, v_ref.reshape(n, n_head_kv, head_dim), rtol=1e-6)


def test_softmax_exp_is_within_a_few_ulps_of_numpy():
    exp = numba.njit(lambda a: np.array([softmax_exp(v) for v in a], np.float32))
    x = np.concatenate([-np.logspace(-8, np.log10(86.9), 20000), [0.0, -0.0]]).astype(np.float32)
    expected = np.exp(x.astype(np.float64))
    assert (np.abs(exp(x) - expected) <= 3e-7 * expected).all()
    tail = exp(np.float32([-87.5, -1000, -np.inf, np.nan]))
    assert (tail[:3] < 2e-38).all() and np.isnan(tail[3])  # nothing against the largest score's exp(0) = 1


def test_all_finite_agrees_with_numpy():
    x = (RNG.standard_normal((3, 640)) * 1e37).astype(np.float32)  # huge but finite: no overflow in the check
    assert all_finite(x) and np.isfinite(x).all()
    for bad in (np.nan, np.inf, -np.inf):
        for where in ((0, 0), (1, 321), (2, 639)):
            y = x.copy()
            y[where] = bad
            assert not all_finite(y)


@numba.njit
def _rotate_all(x, cos, sin, neox):
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            rotate_head(x[t, h], cos[t], sin[t], neox)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope_both_layouts(neox, n_rot):
    x = RNG.standard_normal((6, 3, 64)).astype(np.float32)
    pos = np.arange(10, 16)
    cos, sin = rope_tables(pos, RopeConfig(n_rot=n_rot, base=10000.0, neox=neox))
    ours = x.copy()
    _rotate_all(ours, cos, sin, neox)
    expected = reference.rope(x.astype(np.float64), pos.astype(np.float64), n_rot, 10000.0, neox)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_rope_linear_scaling_divides_positions():
    plain = rope_tables(np.arange(0, 40, 4), RopeConfig(n_rot=16))
    scaled = rope_tables(np.arange(0, 160, 16), RopeConfig(n_rot=16, scaling="linear", factor=4.0))
    np.testing.assert_allclose(scaled[0], plain[0], atol=1e-6)


def test_rope_yarn_keeps_high_frequencies_and_scales_magnitude():
    cfg = RopeConfig(n_rot=64, base=10000.0, scaling="yarn", factor=4.0, n_ctx_orig=4096)
    cos, sin = rope_tables(np.array([100]), cfg)
    mscale = 1 + 0.1 * math.log(4.0)
    np.testing.assert_allclose(cos[0, 0] ** 2 + sin[0, 0] ** 2, mscale**2, rtol=1e-5)
    assert np.isclose(math.atan2(sin[0, 0], cos[0, 0]), math.remainder(100.0, 2 * math.pi), atol=1e-4)


def _attention_reference(q, k, v, start, scale, window, softcap):
    """q [n, heads, hd]; caches [kv_heads, n_ctx, hd]; positions start..start+n-1 see keys <= their own."""
    n, n_head, _ = q.shape
    group = n_head // k.shape[0]
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(n):
        pos = start + t
        keys = np.arange(pos + 1)
        if window:
            keys = keys[pos - keys < window]
        for h in range(n_head):
            s = k[h // group, keys] @ q[t, h] * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[h // group, keys]
    return out


def _listed(q, k, v, start, scale, window, softcap, order=None):
    """attention_listed with each query seeing cells 0..its position (cells = positions, or a permutation)."""
    n = q.shape[0]
    cells = np.arange(k.shape[1]) if order is None else order
    cell_pos = np.empty(k.shape[1], np.int64)
    cell_pos[cells] = np.arange(k.shape[1])
    kc, vc = np.empty_like(k), np.empty_like(v)
    kc[:, cells], vc[:, cells] = k, v  # position p lives in cell cells[p]
    q_pos = np.arange(start, start + n)
    visible = np.stack([np.concatenate([cells[: p + 1], np.zeros(start + n - p - 1, np.int64)]) for p in q_pos])
    out = np.empty_like(q)
    plain = np.zeros((k.shape[0], k.shape[2]), np.float32)  # keys stored as they are: centre 0, spread 1
    attention_listed(out, q, kc, vc, plain, plain + 1, visible, q_pos + 1, cell_pos, q_pos, np.float32(scale), window,
                     np.float32(softcap))
    return out


@pytest.mark.parametrize("n", [4, 12, 70])  # one query block or three (the last partial) in the blocked path
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (40, 0.0), (0, 30.0)])
def test_attention(n, window, softcap):
    n_head, n_kv, hd, start = 6, 2, 32, 9
    q = RNG.standard_normal((n, n_head, hd)).astype(np.float32)
    k = RNG.standard_normal((n_kv, 96, hd)).astype(np.float32)
    v = RNG.standard_normal((n_kv, 96, hd)).astype(np.float32)
    expected = _attention_reference(q.astype(np.float64), k, v, start, 0.3, window, softcap)
    np.testing.assert_allclose(_listed(q, k, v, start, 0.3, window, softcap), expected, rtol=1e-4, atol=1e-5)
    keys = np.arange(start + n)
    out = np.empty_like(q)
    attention_chain(out, q, k[:, keys], v[:, keys], keys, np.arange(start, start + n), np.float32(0.3), window,
                    np.float32(softcap))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_listed_attention_is_independent_of_cell_placement():
    """The same keys in other cells give bit-identical outputs: the kernel walks the list in position order."""
    q = RNG.standard_normal((5, 4, 32)).astype(np.float32)
    k = RNG.standard_normal((2, 40, 32)).astype(np.float32)
    v = RNG.standard_normal((2, 40, 32)).astype(np.float32)
    in_order = _listed(q, k, v, 20, 0.2, 7, 0.0)
    shuffled = _listed(q, k, v, 20, 0.2, 7, 0.0, order=RNG.permutation(40))
    assert np.array_equal(in_order, shuffled)


def test_gated_activations():
    """Against float64 NumPy, over gates from -100 to 100 (exp far from 1 both ways), each token alone too."""
    gate = RNG.standard_normal((3, 40)).astype(np.float32) * 3
    gate[0, :20] = np.linspace(-100, 100, 20)
    up = RNG.standard_normal((3, 40)).astype(np.float32)
    gate_up = np.concatenate([gate, up], axis=1)
    out = np.empty_like(gate)
    for act, expected in ((activations.swiglu, reference.silu), (activations.geglu_tanh, reference.gelu_tanh)):
        act(out, gate_up)
        np.testing.assert_allclose(out, expected(gate.astype(np.float64)) * up, rtol=1e-5, atol=1e-6)
        alone = np.empty((1, 40), np.float32)
        assert all(np.array_equal(act(alone, gate_up[t : t + 1])[0], out[t]) for t in range(3))
    nan = np.full((1, 80), np.nan, np.float32)
    assert np.isnan(activations.swiglu(np.empty((1, 40), np.float32), nan)).all()  # a broken model still stops
    x = gate.copy()
    activations.softcap(x, 2.0)
    np.testing.assert_allclose(x, 2.0 * np.tanh(gate / 2.0), rtol=1e-5, atol=1e-6)


def test_f32_to_f16_bits_rounds_as_numpy():
    """Round to nearest even, overflow to inf, subnormals, NaN: against astype(float16), over every exponent and
    random bit patterns."""
    from llamba.ops.jit import f32_to_f16_bits, kernel

    @kernel
    def convert(out, x):
        for i in range(x.size):
            out[i] = f32_to_f16_bits(x[i])

    magnitudes = RNG.standard_normal(50_000) * 10.0 ** RNG.uniform(-9, 6, 50_000)
    edges = [0.0, -0.0, np.inf, -np.inf, 65504, 65519, 65520, 6.1e-5, 2.98e-8, 3e-8, 5.96e-8]
    patterns = RNG.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([magnitudes.astype(np.float32), np.array(edges, np.float32), patterns])
    x = x[~np.isnan(x)]
    out = np.empty(x.size, np.uint16)
    convert(out, x)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_kv_blocks_are_ggml_blocks(kv_type):
    """A quantized cache's cells hold exactly the bytes ggml's reference quantizer writes, and decode to exactly
    its dequantized values (formats.quants reproduces ggml bit for bit)."""
    from llamba.formats.quants import quantize
    from llamba.ops.kv_blocks import ROW_DTYPE, decode_cells, row_bytes, store_cells

    src = (RNG.standard_normal((5, 2, 64)) * 3).astype(np.float32)
    src[0, 0, :32] = 0  # an all-zero block: scale 0
    src[1, 1, 7] = 500.0  # an outlier
    rows = np.zeros((2, 9, row_bytes(kv_type, 64)), ROW_DTYPE[kv_type])
    cells = np.array([3, 0, 8, 5, 1])
    zero, one = np.zeros((2, 64), np.float32), np.ones((2, 64), np.float32)
    store_cells(rows, cells, src, zero, one)
    expected = quantize(src.reshape(10, 64), kv_type)
    assert np.array_equal(rows[:, cells].transpose(1, 0, 2).reshape(10, -1).view(np.uint8), expected)
    out = np.empty((2, 5, 64), np.float32)
    decode_cells(out, rows, cells, zero, one)
    assert np.array_equal(out.transpose(1, 0, 2).reshape(10, 64), dequantize(expected, kv_type).reshape(10, 64))


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (0, 30.0)])
def test_block_attention_reads_the_codes(kv_type, window, softcap):
    """attention_listed over centred, spread, quantized keys and quantized values equals float64 attention over
    what those codes decode to (decode_cells): the kernel reads the blocks in place, right."""
    from llamba.ops.kv_blocks import ROW_DTYPE, decode_cells, row_bytes, store_cells

    n, n_head, n_kv, hd, start = 6, 4, 2, 64, 30
    n_cells = start + n
    q = RNG.standard_normal((n, n_head, hd)).astype(np.float32)
    k = RNG.standard_normal((n_cells, n_kv, hd)).astype(np.float32)
    centre = (RNG.standard_normal((n_kv, hd)) * 20).astype(np.float32)
    spread = RNG.uniform(0.2, 3.0, (n_kv, hd)).astype(np.float32)
    k = k * spread + centre  # keys with large constant channels, as Qwen's
    v = RNG.standard_normal((n_cells, n_kv, hd)).astype(np.float32)
    width = row_bytes(kv_type, hd)
    k_rows, v_rows = np.zeros((n_kv, n_cells, width), ROW_DTYPE[kv_type]), np.zeros((n_kv, n_cells, width), ROW_DTYPE[kv_type])
    cells = np.arange(n_cells)
    zero, one = np.zeros_like(centre), np.ones_like(centre)
    store_cells(k_rows, cells, k, centre, (1 / spread).astype(np.float32))
    store_cells(v_rows, cells, v, zero, one)
    k_dec, v_dec = np.empty((n_kv, n_cells, hd), np.float32), np.empty((n_kv, n_cells, hd), np.float32)
    decode_cells(k_dec, k_rows, cells, centre, spread)
    decode_cells(v_dec, v_rows, cells, zero, one)
    assert np.abs(k_dec - k.transpose(1, 0, 2)).max() < (0.2 if kv_type == "q8_0" else 2.5)  # the codes are close
    q_pos = np.arange(start, start + n)
    visible = np.stack([np.concatenate([cells[: p + 1], np.zeros(n_cells - p - 1, np.int64)]) for p in q_pos])
    out = np.empty_like(q)
    attention_listed(out, q, k_rows, v_rows, centre, spread, visible, q_pos + 1, cells, q_pos, np.float32(0.1), window,
                     np.float32(softcap))
    expected = _attention_reference(q.astype(np.float64), k_dec, v_dec, start, 0.1, window, softcap)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)
