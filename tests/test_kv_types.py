"""KV cache types on the real test models: f16 is exactly f32 rounded to f16, and costs each model no more than
the noise its own arithmetic makes; q8_0 keeps perplexity within a fraction of a percent.

Why f16 cannot be held to bit-equality with f32, measured (issue 29): llamba, like llama.cpp, rounds the
activations to 8 bits per block of 32 inside every quantized matrix product, a step function. Any change to the
cache, even one of 2 ulps of float32 (2^-22 relative) instead of f16's 2^-11, moves some of those roundings and
then the logits by as much as f16 does (SmolLM2 on gpl-3: mean |logit change| 0.16 either way, top-1 agreement
94.5% for 2-ulp noise against 95.7% for f16). The float64 reference without activation rounding moves by 0.002
from f16. SmolLM2's "What is the capital of France?" is a near-tie of 0.03 between "The" (-> Paris) and "L"
(-> "L'Étoile..."), which the reference with llama.cpp's 8-bit activations answers "L" at f32 and f16 alike.
So the bar here is the models' own noise floor, not 98%."""

from __future__ import annotations

import numpy as np
import pytest

from llamba.generation.perplexity import _negative_log_likelihoods
from llamba.memory.batch import Batch
from llamba.memory.kv_cache import LayerKV
from llamba.models import load_transformer
from llamba.text.tokenizer import Tokenizer
from tests.conftest import REFERENCE_DIR, _model

N_CTX = 512
CHUNKS = {"qwen2.5-coder-1.5b": 2}  # else 6, as benchmarks/kv_types.py: with 2, Gemma's f16 and q8_0 wander by
#                                      half a percent either way (the 1.5B's by a hundredth)


class _RoundedToF16(LayerKV):
    """An f32 cache that stores what an f16 cache would: each value rounded to the nearest float16."""

    def write(self, cells, k, v):
        super().write(cells, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32))


@pytest.fixture(scope="module")
def smollm2():
    return load_transformer(_model("smollm2-135m"))


def test_f16_cache_is_f32_rounded_exactly(smollm2):
    """Prefill and decode over an f16 cache give the bits an f32 cache holding the f16-rounded values gives:
    nothing is lost beyond the rounding (no overflow, no subnormal flushed, the kernels decode every bit)."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 90)]  # > 64: the prefill path
    results = []
    for kv_type in ("f16", "rounded"):
        cache = smollm2.new_cache(256, "f32" if kv_type == "rounded" else "f16")
        if kv_type == "rounded":
            cache._layers = [_RoundedToF16(k, v, cache.cell_pos) for k, v in zip(cache.k, cache.v)]
        logits = [smollm2.forward_tokens(prompt, 0, cache, all_logits=True)]
        for i, token in enumerate([5, 900, 13, 77]):
            logits.append(smollm2.forward(Batch.chain([token], len(prompt) + i), cache))
        results.append(logits)
    assert all(np.array_equal(a, b) for a, b in zip(*results))


def _teacher_forced(model, tokenizer, kv_type, chunks):
    """Logits and per-token NLL over the scored halves of the first chunks of gpl-3.txt."""
    ids = tokenizer.encode((REFERENCE_DIR / "gpl-3.txt").read_text(encoding="utf-8"), add_special=True)
    cache = model.new_cache(N_CTX, kv_type)
    logits, nll = [], []
    for c in range(chunks):
        chunk = list(ids[c * N_CTX:(c + 1) * N_CTX])
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            chunk[0] = tokenizer.bos_id
        rows = model.forward_tokens(chunk, 0, cache, all_logits=True, logits_from=N_CTX // 2)[:-1]
        logits.append(rows.argmax(axis=1))
        nll.append(_negative_log_likelihoods(rows, np.asarray(chunk[N_CTX // 2 + 1:])))
    return np.concatenate(logits), float(np.exp(np.concatenate(nll).mean()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_kv_types_against_f32(name):
    """Teacher-forced on gpl-3 (6 chunks of 512, the 1.5B 2): f16 and q8_0 pick f32's top-1 token at least 93%
    of the time (measured on 2 chunks: f16 95.7 / 97.3 / 97.7 / 99.2%, the floor 2-ulp noise sets) and move
    perplexity by under 1% (Gemma on 6 chunks: f16 +0.24%, q8_0 +0.83%, where llama.cpp's q8_0 gives -0.47%;
    llama.cpp's q8_0 costs the 0.5B +2.1%)."""
    from llamba.api import KEY_CALIBRATION_TEXT

    path = _model(name)
    model = load_transformer(path)
    tokenizer = Tokenizer(model.gguf.metadata, str(path))
    model.calibrate_keys(tokenizer.encode(KEY_CALIBRATION_TEXT))
    chunks = CHUNKS.get(name, 6)
    top1, ppl = _teacher_forced(model, tokenizer, "f32", chunks)
    for kv_type in ("f16", "q8_0"):
        other_top1, other_ppl = _teacher_forced(model, tokenizer, kv_type, chunks)
        assert (other_top1 == top1).mean() >= 0.93, kv_type
        assert abs(other_ppl / ppl - 1) < 0.01, (kv_type, other_ppl, ppl)
