"""Both real test models against llama.cpp's reference outputs in ../shared/reference.

Tolerances, measured rather than assumed: llama.cpp quantizes activations to 8 bits inside every quantized
matrix product and keeps its KV cache in float16, so its logits are not the exact ones. On an F32 conversion of
SmolLM2 (no activation quantization, F32 KV cache) llamba and llama.cpp agree to 4e-5. On the quantized files,
llama.cpp's own logits move by up to 1.02 (SmolLM2) and 1.94 (Gemma 3) when only its KV cache type changes from
f16 to f32, and that run leaves its own greedy continuations at steps 5, 9, 44 and 40 - where llamba's do.
So: logits within 1.0 / 2.0, top-1 equal, top-20 sets overlapping in at least 18, and along the reference
continuation (teacher-forced) the reference token is our top-1 at least 95% of the time and never more than
0.3 below it (a near-tie that llama.cpp's own numerics decide either way).
"""

from __future__ import annotations

import numpy as np
import pytest

from llamba.models import load_transformer
from llamba.runtime.kv_cache import KVCache
from tests.conftest import REFERENCE_FILES, load_reference

MAX_ABS_DIFF = {"smollm2-135m": 1.0, "gemma3-270m": 2.0}
NEAR_TIE = 0.3


@pytest.fixture(scope="module")
def loaded(model_name, model_path, reference_dir):
    ref = load_reference(reference_dir, model_name)
    logits = np.load(reference_dir / f"{REFERENCE_FILES[model_name]}.logits.npz")
    return model_name, load_transformer(model_path), ref, logits


def test_last_position_logits(loaded):
    name, model, ref, ref_logits = loaded
    for i, case in enumerate(ref["greedy"]):
        ours = model.forward_tokens(case["prompt_ids"], 0, KVCache.for_model(model.hp, 256))
        expected = ref_logits[f"p{i}"]
        assert np.abs(ours - expected).max() < MAX_ABS_DIFF[name], case["prompt"]
        top20 = set(np.argsort(-ours)[:20].tolist())
        assert len(top20 & set(case["top20_ids"])) >= 18, case["prompt"]
        best, theirs = int(ours.argmax()), int(expected.argmax())
        # top-1 must agree, unless the two candidates are a near-tie in our own logits
        assert best == theirs or ours[best] - ours[theirs] < 0.05, case["prompt"]


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
            assert logits.max() - logits[token] < NEAR_TIE, (case["prompt"], steps)
            logits = model.forward_tokens([token], pos, cache)
            pos += 1
    assert exact >= 0.95 * steps


def test_free_running_greedy_starts_like_llama_cpp(loaded):
    name, model, ref, _ = loaded
    case = ref["greedy"][1] if name == "smollm2-135m" else ref["greedy"][0]
    cache = KVCache.for_model(model.hp, 256)
    logits = model.forward_tokens(case["prompt_ids"], 0, cache)
    pos, generated = len(case["prompt_ids"]), []
    for _ in range(12):
        generated.append(int(logits.argmax()))
        logits = model.forward_tokens([generated[-1]], pos, cache)
        pos += 1
    assert generated == case["greedy64"][:12]


LLAMA_CPP_PERPLEXITY = {"smollm2-135m": 18.3914, "gemma3-270m": 13.9062}  # llama-perplexity -c 512 on gpl-3.txt


def test_perplexity_within_one_percent_of_llama_cpp(loaded, reference_dir):
    from llamba.runtime.perplexity import perplexity
    from llamba.runtime.tokenizer import Tokenizer

    name, model, _, _ = loaded
    text = (reference_dir / "gpl-3.txt").read_text(encoding="utf-8")
    result = perplexity(model, Tokenizer(model.gguf.metadata), KVCache.for_model(model.hp, 512), text, 512)
    assert result.chunks == 14
    assert abs(result.ppl / LLAMA_CPP_PERPLEXITY[name] - 1) < 0.01, result.ppl
