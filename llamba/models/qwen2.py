"""Qwen2 / Qwen2.5: the llama recipe with biases on Q, K and V, and half-split (NEOX) RoPE."""

from ..formats.gguf import GGUFFile
from .hf import HFSpec
from .metadata import HParams, read_common

HF = HFSpec(arch="qwen2", classes=("Qwen2ForCausalLM",), model_type="qwen2", export_config={"hidden_act": "silu"})


def hparams(g: GGUFFile) -> HParams:
    return read_common(g, neox=True)  # the biases are picked up from the attn_{q,k,v}.bias tensors
