"""The batch mechanism: a token's logits are bit-identical alone, as one of a line or tree of guesses, and
beside other sequences; rejected guesses leave the cache as if they had never been there."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from llamba.errors import LlambaError
from llamba.models import load_transformer
from llamba.ops.threads import ThreadGovernor
from llamba.memory.batch import Batch
from llamba.memory.kv_cache import KVCache
from tests.tiny_models import write_tiny_model

PROMPT = [5, 17, 299, 0, 42, 42, 7, 123, 250, 3, 88]
GUESSES = [9, 200, 31, 31, 4, 150, 77, 12]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def tiny(request, tmp_path_factory):
    n_layer = 6 if request.param == "gemma3" else 2
    return load_transformer(write_tiny_model(tmp_path_factory.mktemp(request.param) / "t.gguf", request.param,
                                             n_layer=n_layer))


def _one_at_a_time(model, prompt, tokens, kv_type="f32"):
    """Logits of each token evaluated alone after the prompt (the plain decoding loop)."""
    cache = model.new_cache(128, kv_type)
    model.forward_tokens(prompt, 0, cache)
    return np.stack([model.forward_tokens([t], len(prompt) + i, cache) for i, t in enumerate(tokens)])


def _check_invariance(model, prompt, guesses, kv_type="f32"):
    alone = _one_at_a_time(model, prompt, guesses, kv_type)
    # a line of guesses in one batch
    cache = model.new_cache(128, kv_type)
    model.forward_tokens(prompt, 0, cache)
    line = model.forward(Batch.chain(guesses, len(prompt), logits="all"), cache)
    assert np.array_equal(line, alone)
    # the same guesses as one branch of a tree: two siblings at the first position, each with its own line
    cache.remove(0, len(prompt))
    decoy = [(g + 1) % model.hp.n_vocab for g in guesses[:3]]
    tree = _tree(prompt_len=len(prompt), branches=[guesses, decoy])
    logits = model.forward(tree, cache)
    assert np.array_equal(logits[: len(guesses)], alone)
    assert np.array_equal(logits[len(guesses) :], _one_at_a_time(model, prompt, decoy, kv_type))
    # beside another sequence that holds a different prompt
    cache = model.new_cache(128, kv_type)
    model.forward(Batch.chain(prompt, 0), cache)
    other = prompt[::-1][:7]
    model.forward(Batch.chain(other, 0, seq=1), cache)
    both = model.forward(Batch.join([Batch.chain(guesses, len(prompt), logits="all"),
                                     Batch.chain(guesses[:4], len(other), seq=1, logits="all")]), cache)
    assert np.array_equal(both[: len(guesses)], alone)
    assert np.array_equal(both[len(guesses) :], _one_at_a_time(model, other, guesses[:4], kv_type))


def _tree(prompt_len: int, branches: list[list[int]]) -> Batch:
    parts = [Batch.chain(b, prompt_len, logits="all") for b in branches]
    return Batch.join(parts)


def test_logits_are_batch_invariant(tiny):
    _check_invariance(tiny, PROMPT, GUESSES)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_logits_are_batch_invariant_for_every_kv_type(tiny, kv_type):
    """The quantized caches too: a token's codes depend on its own key alone, and each query reads its list."""
    tiny.calibrate_keys(PROMPT)  # centred, spread keys: the quantized caches' whole path
    _check_invariance(tiny, PROMPT * 7, GUESSES, kv_type)  # 77 tokens: the prompt takes the prefill path


def test_rejected_guesses_leave_no_trace(tiny):
    cache = KVCache.for_model(tiny.hp, 128)
    tiny.forward_tokens(PROMPT, 0, cache)
    placed = tiny.forward(Batch.chain(GUESSES, len(PROMPT), logits="all"), cache)
    cache.remove(0, len(PROMPT) + 3)  # keep three guesses
    assert cache.n_past == len(PROMPT) + 3
    nxt = tiny.forward_tokens([GUESSES[3]], len(PROMPT) + 3, cache)
    assert np.array_equal(nxt, placed[3])


def test_batch_errors_are_clear(tiny):
    cache = KVCache.for_model(tiny.hp, 32)
    tiny.forward_tokens(PROMPT, 0, cache)
    with pytest.raises(LlambaError, match="already in the cache"):
        tiny.forward(Batch.chain([1], 3), cache)
    with pytest.raises(LlambaError, match="context is full"):
        tiny.forward(Batch.chain(list(range(30)), len(PROMPT)), cache)
    bad = Batch.chain([1, 2], len(PROMPT))
    bad.parents[1] = 1
    with pytest.raises(LlambaError, match="parent"):
        tiny.forward(bad, cache)
    assert cache.n_past == len(PROMPT)  # nothing was placed by the failed batches


@pytest.mark.slow
def test_real_models_are_batch_invariant(model_path):
    model = load_transformer(model_path)
    prompt = [int(t) for t in np.random.default_rng(1).integers(100, 5000, 40)]
    guesses = [int(t) for t in np.random.default_rng(2).integers(100, 5000, 17)]
    _check_invariance(model, prompt, guesses)
    _check_thread_invariance(model, prompt * 2, guesses)


def test_logits_do_not_depend_on_the_thread_count(tiny):
    _check_thread_invariance(tiny, PROMPT * 7, GUESSES)  # 77 tokens: the prefill path too


def _check_thread_invariance(model, prompt, guesses):
    """The thread governor may change the count at any forward: each output is computed in one thread in a
    fixed order, so prompts, single tokens and trees give the same bits at 1 thread and at 2."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    results = []
    for threads in (1, 2):
        model.threads = ThreadGovernor(fixed=threads)
        cache = KVCache.for_model(model.hp, 256)
        prompt_logits = model.forward_tokens(prompt, 0, cache, all_logits=True)
        tree = model.forward(_tree(len(prompt), [guesses, guesses[:3][::-1]]), cache)
        results.append((prompt_logits, tree))
    model.threads = ThreadGovernor()
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])
