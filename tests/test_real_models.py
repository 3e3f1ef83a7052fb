"""The real test models against llama.cpp's reference outputs in tests/reference_data (SmolLM2 and Gemma from
llama.cpp's tools, Qwen2.5-Coder-1.5B from llama-cpp-python: benchmarks/make_reference.py).

Tolerances, measured rather than assumed: llama.cpp quantizes activations to 8 bits inside every quantized
matrix product and keeps its KV cache in float16, so its logits are not the exact ones. On an F32 conversion of
SmolLM2 (no activation quantization, F32 KV cache) llamba and llama.cpp agree to 4e-5. On the quantized files,
llama.cpp's own logits move by up to 1.02 (SmolLM2) and 1.94 (Gemma 3) when only its KV cache type changes from
f16 to f32, and that run leaves its own greedy continuations at steps 5, 9, 44 and 40 - where llamba's do.
So: logits within 1.0 / 2.0 once a common shift is taken out (softmax does not see one), top-1 equal, top-20
sets overlapping in at least 18, and along the reference continuation (teacher-forced) the reference token is
our top-1 at least 95% of the time and, where not, a near-tie: at least two thirds as likely as our top-1
(log 1.5 = 0.41 below it; Gemma, twice as noisy, half as likely: log 2 = 0.69), a choice llama.cpp's own
numerics make either way. Gemma's widest miss moved with each change of llamba's rounding, at 251 of 256 steps
right: 0.234 (activations per block of 32), 0.301 (K-quant activations per super-block, as llama.cpp's q8_K),
0.482 (decoding attention split in spans).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llamba.models import load_transformer
from llamba.memory.kv_cache import KVCache
from tests.conftest import REFERENCE_FILES, _model, load_reference

MAX_ABS_DIFF = {"smollm2-135m": 1.0, "gemma3-270m": 2.0, "qwen2.5-coder-1.5b": 1.0}
# A near-tie: the reference token at least two thirds as likely as our top-1; on Gemma, whose logits llama.cpp's
# own numerics move twice as far (MAX_ABS_DIFF), at least half as likely.
NEAR_TIE = {"smollm2-135m": math.log(1.5), "gemma3-270m": math.log(2.0), "qwen2.5-coder-1.5b": math.log(1.5)}


@pytest.fixture(scope="module", params=list(REFERENCE_FILES))
def loaded(request, reference_dir):
    """The laptop-class 1.5B too (a 1 GB pull on a fresh machine, once): the lead must hold where users are."""
    name = request.param
    ref = load_reference(reference_dir, name)
    logits = np.load(reference_dir / f"{REFERENCE_FILES[name]}.logits.npz")
    return name, load_transformer(_model(name)), ref, logits


def test_last_position_logits(loaded):
    name, model, ref, ref_logits = loaded
    for i, case in enumerate(ref["greedy"]):
        ours = model.forward_tokens(case["prompt_ids"], 0, KVCache.for_model(model.hp, 256))
        expected = ref_logits[f"p{i}"]
        difference = ours - expected
        assert np.abs(difference - np.median(difference)).max() < MAX_ABS_DIFF[name], case["prompt"]
        top20 = set(np.argsort(-ours)[:20].tolist())
        assert len(top20 & set(case["top20_ids"])) >= 18, case["prompt"]
        best, theirs = int(ours.argmax()), int(expected.argmax())
        # top-1 must agree, unless the two candidates are a near-tie (Gemma's "List three primary colors"
        # is one: 0.02 apart in llama.cpp's logits)
        assert best == theirs or ours[best] - ours[theirs] < NEAR_TIE[name], case["prompt"]


def test_greedy_continuation_teacher_forced(loaded):
    name, model, ref, _ = loaded
    steps = exact = 0
    for case in ref["greedy"]:
        cache = KVCache.for_model(model.hp, 256)
        logits = model.forward_tokens(case["prompt_ids"], 0, cache)
        pos = len(case["prompt_ids"])
        for token in case["greedy64"]:
            steps += 1
            exact += int(logits.argmax()) == token
            assert logits.max() - logits[token] < NEAR_TIE[name], (case["prompt"], steps)
            logits = model.forward_tokens([token], pos, cache)
            pos += 1
    assert exact >= 0.95 * steps


def test_free_running_greedy_follows_llama_cpp_until_a_near_tie(loaded):
    """Left to itself, greedy decoding makes llama.cpp's choices; where it first parts from them, the two
    tokens are a near-tie (Gemma's continuations are full of them: 0.006 to 0.2 apart)."""
    name, model, ref, _ = loaded
    for case in ref["greedy"]:
        cache = KVCache.for_model(model.hp, 256)
        logits = model.forward_tokens(case["prompt_ids"], 0, cache)
        pos = len(case["prompt_ids"])
        for step, token in enumerate(case["greedy64"][:32]):
            best = int(logits.argmax())
            if best != token:
                assert logits[best] - logits[token] < NEAR_TIE[name], (case["prompt"], step)
                break
            logits = model.forward_tokens([best], pos, cache)
            pos += 1


# llama-perplexity -c 512 on gpl-3.txt: (perplexity, chunks, tolerance); the 1.5B's from llama-cpp-python on 4
# chunks, within the laptop-class issue's 1% (a perplexity this low, 1.77, moves 0.7% for 0.006 nats a token)
LLAMA_CPP_PERPLEXITY = {"smollm2-135m": (18.3914, 14, 0.005), "gemma3-270m": (13.9062, 14, 0.005),
                        "qwen2.5-coder-1.5b": (1.7711, 4, 0.01)}


def test_perplexity_close_to_llama_cpp(loaded, reference_dir):
    from llamba.generation.perplexity import perplexity
    from llamba.text.tokenizer import Tokenizer

    name, model, _, _ = loaded
    text = (reference_dir / "gpl-3.txt").read_text(encoding="utf-8")
    expected, chunks, tolerance = LLAMA_CPP_PERPLEXITY[name]
    result = perplexity(model, Tokenizer(model.gguf.metadata), KVCache.for_model(model.hp, 512), text, 512, chunks)
    assert result.chunks == chunks
    assert abs(result.ppl / expected - 1) < tolerance, result.ppl
