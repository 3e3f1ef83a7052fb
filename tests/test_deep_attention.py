"""Decoding attention over a deep cache, split into spans of cells (flash-decoding): right against float64 for every
KV type, and bit-identical whatever the thread count, the batch around a query, or where its cells sit."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from llamba.memory.batch import Batch
from llamba.memory.kv_cache import KV_TYPES, KVCache
from llamba.models import load_transformer
from llamba.ops.attention import SPAN, attention_listed
from llamba.ops.kv_blocks import decode_cells
from llamba.ops.threads import ThreadGovernor, set_threads, thread_limit
from tests.tiny_models import write_tiny_model

RNG = np.random.default_rng(29)
N_HEAD, N_KV, HEAD_DIM = 6, 2, 64
DEPTHS = (2 * SPAN + 37, SPAN, 5)  # three spans (the last partial), exactly one, a short one


def _cache(kv_type: str, n_cells: int) -> KVCache:
    """A one-layer cache holding random keys (with large constant channels, as Qwen's) and values, its cells
    placed in a shuffled order, the key statistics taken from those keys as a model's calibration does."""
    keys = RNG.standard_normal((n_cells, N_KV, HEAD_DIM)).astype(np.float32) * 2
    keys[:, :, :4] += 40
    values = RNG.standard_normal((n_cells, N_KV, HEAD_DIM)).astype(np.float32)
    stats = None
    if kv_type in ("q8_0", "q4_0"):
        from llamba.memory.kv_cache import KeyStatistics

        stats = KeyStatistics.of_keys([keys.transpose(1, 0, 2)], neox=True)
    cache = KVCache(1, N_KV, HEAD_DIM, n_cells, kv_type, n_cells=n_cells, key_stats=stats)
    cells = RNG.permutation(n_cells)
    cache.layer(0).write(cells, keys, values)
    cache.cell_pos[cells] = np.arange(n_cells)
    return cache, cells


def _decoded(cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
    """What the cache holds, as float32 [n_kv, cell, head_dim]: the values attention should be computing over."""
    layer = cache.layer(0)
    if cache.kv_type in ("f32", "f16"):
        as_f32 = lambda a: a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a  # noqa: E731
        return as_f32(layer.k), as_f32(layer.v)
    every = np.arange(cache.n_cells)
    k, v = (np.empty((N_KV, cache.n_cells, HEAD_DIM), np.float32) for _ in range(2))
    decode_cells(k, layer.k, every, layer.centre, layer.spread)
    decode_cells(v, layer.v, every, layer.zero, layer.one)
    return k, v


def _attend(cache, cells, q, depths, window=0):
    """Query t at position depths[t] sees the positions before it and itself (the cells holding them)."""
    visible = np.zeros((len(depths), max(depths) + 1), np.int64)
    for t, d in enumerate(depths):
        visible[t, : d + 1] = cells[: d + 1]
    out = np.empty_like(q)
    layer = cache.layer(0)
    attention_listed(out, q, layer.k, layer.v, layer.centre, layer.spread, visible, np.asarray(depths) + 1,
                     cache.cell_pos, np.asarray(depths, np.int64), np.float32(0.125), window, np.float32(0.0))
    return out


@pytest.mark.parametrize("kv_type", KV_TYPES)
@pytest.mark.parametrize("window", [0, SPAN + 10])
def test_deep_attention_matches_float64(kv_type, window):
    """Spans merged by their largest score and sums give the softmax over all the cells, within float32
    rounding of float64 attention over the cache's decoded contents (with a sliding window too)."""
    cache, cells = _cache(kv_type, max(DEPTHS) + 1)
    q = RNG.standard_normal((len(DEPTHS), N_HEAD, HEAD_DIM)).astype(np.float32) / 4
    out = _attend(cache, cells, q, DEPTHS, window)
    keys, values = _decoded(cache)
    for t, depth in enumerate(DEPTHS):
        seen = cells[max(0, depth + 1 - window) if window else 0 : depth + 1]
        for h in range(N_HEAD):
            kv = h // (N_HEAD // N_KV)
            scores = keys[kv, seen].astype(np.float64) @ q[t, h] * 0.125
            p = np.exp(scores - scores.max())
            expected = (p / p.sum()) @ values[kv, seen]
            np.testing.assert_allclose(out[t, h], expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_deep_attention_is_the_same_alone_in_a_batch_and_at_any_thread_count(kv_type):
    """Each query's bits do not depend on the other queries of its batch, nor on how many threads share the
    spans: the spans are cut from the query's own list and merged in order."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    cache, cells = _cache(kv_type, max(DEPTHS) + 1)
    q = RNG.standard_normal((len(DEPTHS), N_HEAD, HEAD_DIM)).astype(np.float32)
    limit = thread_limit()
    try:
        results = []
        for threads in (1, 2):
            set_threads(threads)
            together = _attend(cache, cells, q, DEPTHS)
            alone = np.stack([_attend(cache, cells, q[t : t + 1], [d])[0] for t, d in enumerate(DEPTHS)])
            assert np.array_equal(together, alone)
            results.append(together)
        assert np.array_equal(*results)
    finally:
        set_threads(limit)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    model = load_transformer(write_tiny_model(tmp_path_factory.mktemp("qwen2") / "t.gguf", "qwen2"))
    model.calibrate_keys(list(range(1, 200)))
    return model


@pytest.mark.parametrize("kv_type", KV_TYPES)
def test_decoding_at_depth_is_batch_and_thread_invariant(tiny_qwen, kv_type):
    """A model decoding past its first span of context: a line of guesses gives each token's logits alone, also beside
    another sequence, at 1 thread and at 2."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    prompt = [int(t) for t in RNG.integers(1, 299, SPAN + 150)]  # two spans (the tiny model holds 512)
    guesses = [9, 200, 31, 31, 4]
    results = []
    for threads in (1, 2):
        tiny_qwen.threads = ThreadGovernor(fixed=threads)
        cache = tiny_qwen.new_cache(512, kv_type)
        tiny_qwen.forward_tokens(prompt, 0, cache)
        alone = [tiny_qwen.forward_tokens([g], len(prompt) + i, cache) for i, g in enumerate(guesses)]
        cache.trim(len(prompt))
        tiny_qwen.forward(Batch.chain(prompt[:50], 0, seq=1), cache)
        both = tiny_qwen.forward(Batch.join([Batch.chain(guesses, len(prompt), logits="all"),
                                             Batch.chain(guesses[:2], 50, seq=1, logits="all")]), cache)
        assert np.array_equal(both[: len(guesses)], np.stack(alone))
        results.append(both)
    tiny_qwen.threads = ThreadGovernor()
    assert np.array_equal(*results)
