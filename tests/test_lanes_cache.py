"""The repacked-weights cache: a second load maps the first load's bytes, computes the same logits bit for bit,
and anything off about the file (another model version, a short file, no writable cache) means repacking."""

from __future__ import annotations

import os

import numpy as np
import pytest

from llamba.models import lanes_cache, load_transformer
from llamba.memory.kv_cache import KVCache
from tests.tiny_models import write_tiny_model

TOKENS = [1, 5, 9, 2, 7]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMBA_LANES_DIR", str(tmp_path / "lanes"))
    monkeypatch.setattr(lanes_cache, "MIN_BYTES", 0)  # the tiny model is worth caching here
    return write_tiny_model(tmp_path / "tiny.gguf", "gemma3")


def _logits(model) -> np.ndarray:
    return model.forward_tokens(TOKENS, 0, KVCache.for_model(model.hp, 16), all_logits=True)


def _weights(model) -> list[np.ndarray]:
    matrices = [model.tok_embd, model.output] + [m for layer in model.layers for m in layer.matrices]
    return [a for m in matrices for a in (m.codes, m.scale, m.offset)]


def test_second_load_maps_the_first_loads_weights(tiny):
    first = load_transformer(tiny)
    assert not first.weights_mapped and lanes_cache.cache_file(str(tiny)).is_file()
    second = load_transformer(tiny)
    assert second.weights_mapped
    for repacked, mapped in zip(_weights(first), _weights(second), strict=True):
        assert repacked.dtype == mapped.dtype and mapped.flags.writeable  # the kernels' one signature
        np.testing.assert_array_equal(repacked, mapped)
    np.testing.assert_array_equal(_logits(first), _logits(second))


def test_a_new_version_of_the_model_is_repacked(tiny):
    load_transformer(tiny)
    os.utime(tiny, ns=(0, os.stat(tiny).st_mtime_ns + 10**9))
    assert not load_transformer(tiny).weights_mapped
    assert load_transformer(tiny).weights_mapped  # the new version's cache replaced the old


def test_a_short_cache_file_is_repacked_over(tiny):
    expected = _logits(load_transformer(tiny))
    cached = lanes_cache.cache_file(str(tiny))
    cached.write_bytes(cached.read_bytes()[:-100])
    model = load_transformer(tiny)
    assert not model.weights_mapped
    np.testing.assert_array_equal(_logits(model), expected)
    assert load_transformer(tiny).weights_mapped


def test_an_unwritable_cache_is_no_cache(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("LLAMBA_LANES_DIR", str(blocker / "lanes"))
    assert not load_transformer(tiny).weights_mapped
    assert not load_transformer(tiny).weights_mapped
    assert blocker.read_text() == ""


def test_files_of_models_that_are_gone_are_removed(tiny, tmp_path):
    other = write_tiny_model(tmp_path / "other.gguf", "llama")
    load_transformer(other)
    other.unlink()
    load_transformer(tiny)  # writing a cache file tidies the folder
    assert [p.name for p in lanes_cache.cache_dir().iterdir()] == [lanes_cache.cache_file(str(tiny)).name]
