"""Mixtures of experts judged by llama.cpp: each seeded checkpoint of tests/moe_reference.py is rebuilt (the
same GGUF bytes llama.cpp ran, checked by sha256) and llamba's teacher-forced logits are compared with
llama.cpp's kept in tests/reference_data/moe (benchmarks/make_moe_reference.py regenerates them), and the
q4_k_m preset's types with llama-quantize's on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamba.convert.requantize import requantize
from llamba.formats.gguf import open_gguf
from llamba.memory.kv_cache import KVCache
from llamba.models import load_transformer
from tests.moe_reference import CASES, QUANTIZE_TYPES, QUANTIZED_CASES, REFERENCE, build, sha256

# F32 files: the same float products up to summation order (llama.cpp keeps its KV cache in F16); Q8_0 files:
# each token's inputs quantized to 8 bits by both, some rounded apart (measured: 1.3e-4 and 5.5e-3 at most)
TOLERANCE = {"f32": 1e-3, "q8_0": 0.015}  # of the largest logit's magnitude
# latent attention chains three low-rank products per layer (q_a, q_b, k_b) whose 8-bit roundings add up:
# at Q8_0 llamba and llama.cpp are each 2-5% of the largest logit from the checkpoint's float64 forward
TOLERANCE_LATENT_Q8 = 0.08


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_llama_cpp(name, tmp_path):
    reference = np.load(REFERENCE / f"{name}.npz")
    path = build(name, tmp_path)
    assert sha256(path) == str(reference["sha256"]), "the seeded checkpoint no longer converts to the same GGUF"
    model = load_transformer(path)
    ids = reference["tokens"]
    ours = model.forward_tokens(ids, 0, KVCache.for_model(model.hp, 128, kv_type="f32"), all_logits=True)
    theirs = reference["logits"]
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.98
    output_type = CASES[name][1]
    latent_q8 = name.startswith("deepseek") and output_type == "q8_0"
    tolerance = TOLERANCE_LATENT_Q8 if latent_q8 else TOLERANCE[output_type]
    assert np.abs(ours - theirs).max() <= tolerance * np.abs(theirs).max()


def _types(path) -> dict[str, str]:
    return {name: t.type.name for name, t in open_gguf(path).tensors.items()}


@pytest.mark.parametrize("name", QUANTIZED_CASES)
def test_q4_k_m_types_match_llama_quantize(name, tmp_path):
    """The q4_k_m preset, converting a checkpoint and quantizing its F32 file, gives every tensor the type
    llama-quantize's Q4_K_M gave it (Mixtral's 4 experts and the rest's 8, Phi-3's fused attn_qkv, DeepSeek's
    split attn_k_b / attn_v_b, the experts' down projections, V2-Lite's 27 layers)."""
    theirs = json.loads(QUANTIZE_TYPES.read_text())[name]
    assert _types(build(name, tmp_path / "converted", "q4_k_m")) == theirs
    f32 = build(name, tmp_path / "f32")
    assert _types(requantize(f32, tmp_path / "quantized.gguf", "q4_k_m")) == theirs
