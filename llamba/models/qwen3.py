"""Qwen3: the qwen2 recipe without QKV biases, with RMSNorm on each head of Q and K before RoPE."""

from ..formats.gguf import GGUFFile
from .hf import HFSpec
from .metadata import HParams, read_common

HF = HFSpec(arch="qwen3", classes=("Qwen3ForCausalLM",), model_type="qwen3", export_config={"hidden_act": "silu"})


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.qk_norm = True
    return hp
