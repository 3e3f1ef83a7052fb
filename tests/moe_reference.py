"""The seeded checkpoints of the families with no real model here (the mixtures of experts, Phi-3) whose
llama.cpp logits are kept in tests/reference_data/moe/, and how each becomes its GGUF: the same bytes every
time (the reference records the file's sha256), so the test runs llamba on the very file llama.cpp ran."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from llamba.convert import convert
from tests.hf_checkpoints import DEEPSEEK_YARN, QWEN_YARN, write_checkpoint

REFERENCE = Path(__file__).parent / "reference_data" / "moe"
CASES = {  # name -> (Hugging Face class, output type, seed, config changes)
    f"{family}-{output_type}": (model_class, output_type, seed, {})
    for family, model_class, seed in (("qwen2moe", "Qwen2MoeForCausalLM", 11), ("qwen3moe", "Qwen3MoeForCausalLM", 12),
                                      ("mixtral", "MixtralForCausalLM", 13), ("olmoe", "OlmoeForCausalLM", 14),
                                      ("phi3", "Phi3ForCausalLM", 15), ("deepseek2", "DeepseekV2ForCausalLM", 16),
                                      ("deepseek3", "DeepseekV3ForCausalLM", 18))
    for output_type in ("f32", "q8_0")
}
# V2-Lite's layout: no q_lora_rank, which llama.cpp recognises by the layer count alone
CASES["deepseek2-lite-f32"] = ("DeepseekV2ForCausalLM", "f32", 17, {"num_hidden_layers": 27, "q_lora_rank": None})
# YaRN: DeepSeek's (the attention scale takes mscale_all_dim) and Qwen2.5's (cos and sin take the mscale)
CASES["deepseek2-yarn-f32"] = ("DeepseekV2ForCausalLM", "f32", 19, DEEPSEEK_YARN)
CASES["qwen2-yarn-f32"] = ("Qwen2ForCausalLM", "f32", 20, QWEN_YARN)
# V2's group_limited_greedy: two groups of four experts, the one whose two best sum highest kept
CASES["deepseek2-groups-f32"] = ("DeepseekV2ForCausalLM", "f32", 21,
                                 {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1})
N_TOKENS = 64  # teacher-forced positions


QUANTIZE_TYPES = REFERENCE / "q4_k_m_types.json"  # case -> tensor -> the type llama-quantize Q4_K_M gave it
QUANTIZED_CASES = [name for name in CASES if name.endswith("-f32")]  # their F32 files, quantized by llama.cpp


def build(name: str, folder: Path, output_type: str | None = None) -> Path:
    """The case's checkpoint written into folder/hf and converted to folder/NAME.gguf (in the case's output
    type, or the one given)."""
    model_class, case_type, seed, changes = CASES[name]
    checkpoint = write_checkpoint(folder / "hf", model_class, seed=seed, **changes)
    return convert(checkpoint, folder / f"{name}.gguf", output_type or case_type)


def tokens(n_vocab: int, seed: int) -> np.ndarray:
    """The teacher-forced sequence: seeded random ids (a random model has no text it prefers)."""
    return np.random.default_rng(seed).integers(0, n_vocab, N_TOKENS)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
