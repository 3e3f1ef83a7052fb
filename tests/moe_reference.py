"""The seeded checkpoints of the families with no real model here (the mixtures of experts, Phi-3) whose
llama.cpp logits are kept in tests/reference_data/moe/, and how each becomes its GGUF: the same bytes every
time (the reference records the file's sha256), so the test runs llamba on the very file llama.cpp ran."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from llamba.convert import convert
from tests.hf_checkpoints import write_checkpoint

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
N_TOKENS = 64  # teacher-forced positions


def build(name: str, folder: Path) -> Path:
    """The case's checkpoint written into folder/hf and converted to folder/NAME.gguf."""
    model_class, output_type, seed, changes = CASES[name]
    checkpoint = write_checkpoint(folder / "hf", model_class, seed=seed, **changes)
    return convert(checkpoint, folder / f"{name}.gguf", output_type)


def tokens(n_vocab: int, seed: int) -> np.ndarray:
    """The teacher-forced sequence: seeded random ids (a random model has no text it prefers)."""
    return np.random.default_rng(seed).integers(0, n_vocab, N_TOKENS)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
