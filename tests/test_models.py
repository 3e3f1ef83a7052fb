"""Each architecture as a tiny random GGUF model: llamba's forward against the NumPy reference, and
prefill of N tokens against N single steps through the cache."""

from __future__ import annotations

import numpy as np
import pytest

from llamba.errors import UnsupportedError
from llamba.formats.gguf import open_gguf
from llamba.models import load_transformer
from llamba.memory.kv_cache import KVCache
from tests.reference import ReferenceModel
from tests.tiny_models import write_tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
TOKENS = [5, 17, 299, 0, 42, 42, 7, 123, 250, 3, 88]  # longer than gemma3's tiny window of 4


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    n_layer = 6 if request.param == "gemma3" else 2  # gemma3: five sliding-window layers, then a global one
    path = write_tiny_model(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param, n_layer=n_layer)
    return load_transformer(path), ReferenceModel(open_gguf(path))


def _relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def test_forward_matches_reference(tiny):
    """The kernels round each block of inputs to 8 bits as the reference does, but an input that lands within
    float rounding of a tie can round the other way (1 to 4 sequences in 6 here, more with more layers), which
    moves the logits by up to about 1%. So: every sequence within 2%, and some to float precision."""
    model, reference = tiny
    sequences = [TOKENS] + [[int(t) for t in np.random.default_rng(seed).integers(0, 300, 11)] for seed in range(5)]
    errors = []
    for tokens in sequences:
        logits = model.forward_tokens(tokens, 0, KVCache.for_model(model.hp, 64), all_logits=True)
        assert logits.shape == (len(tokens), 300)
        errors.append(_relative_error(logits, reference.forward(tokens)))
    assert max(errors) < 2e-2 and sum(e < 1e-4 for e in errors) >= 2, errors


def test_prefill_equals_single_steps(tiny):
    model, _ = tiny
    batch = model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 64), all_logits=True)
    cache = KVCache.for_model(model.hp, 64)
    steps = np.stack([model.forward_tokens([t], i, cache) for i, t in enumerate(TOKENS)])
    assert _relative_error(steps, batch) < 1e-5


def test_prefill_in_pieces_continues_the_cache(tiny):
    model, _ = tiny
    whole = model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 64))
    cache = KVCache.for_model(model.hp, 64)
    model.forward_tokens(TOKENS[:4], 0, cache)
    model.forward_tokens(TOKENS[4:7], 4, cache)
    assert _relative_error(model.forward_tokens(TOKENS[7:], 7, cache), whole) < 1e-5


def test_context_overflow_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(Exception, match="context is full"):
        model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 8))


@pytest.mark.parametrize("types", [
    {"embd": "F16", "q": "F32", "k": "F16", "v": "BF16", "o": "Q8_0", "gate": "Q2_K", "up": "Q3_K", "down": "Q5_1"},
    {"embd": "Q4_0", "q": "Q4_0", "k": "Q4_0", "v": "Q4_0", "o": "Q4_1", "gate": "Q6_K", "up": "Q6_K", "down": "Q8_0"},
])
def test_every_weight_type_through_a_model(tmp_path, types):
    path = write_tiny_model(tmp_path / "mixed.gguf", "llama", types=types)
    model, reference = load_transformer(path), ReferenceModel(open_gguf(path))
    logits = model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 64), all_logits=True)
    expected = reference.forward(TOKENS)
    assert _relative_error(logits[0], expected[0]) < 1e-4
    # Later tokens attend to earlier ones through 4-bit projections: an input that float32 and float64 put
    # on either side of an 8-bit rounding boundary moves by a whole step, and this random model amplifies it.
    # A wrong block decoding would be off by the size of the logits, not by 1-2%.
    assert _relative_error(logits, expected) < 2e-2


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="architecture 'mamba' is not supported.*gemma3.*llama"):
        load_transformer(tmp_path / "x.gguf")


def test_float16_kv_cache_stays_close(tiny):
    model, reference = tiny
    expected = reference.forward(TOKENS, kv_type="f16")
    for n_prefill in (len(TOKENS), 3):  # the blocked prefill path, and decode steps over a half-float cache
        cache = KVCache.for_model(model.hp, 64, kv_type="f16")
        model.forward_tokens(TOKENS[:n_prefill], 0, cache)
        logits = None
        for i in range(n_prefill, len(TOKENS)):
            logits = model.forward_tokens([TOKENS[i]], i, cache)
        if logits is None:
            logits = model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 64, kv_type="f16"))
        assert cache.k[0].dtype == np.uint16
        assert _relative_error(logits, expected[-1]) < 5e-3
