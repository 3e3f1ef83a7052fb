"""The llama family: Llama 2/3.x, TinyLlama, SmolLM2, Mistral (and any `llama`-architecture GGUF).

RoPE on adjacent pairs (NORM): llama.cpp's converter permutes Q/K rows so the pairs line up.
"""

from ..formats.gguf import GGUFFile
from .hf import ConfigKey, HFSpec
from .metadata import HParams, read_common

HF = HFSpec(
    arch="llama",
    classes=("LlamaForCausalLM", "MistralForCausalLM"),
    model_type="llama",
    keys=(ConfigKey("vocab_size", "vocab_size", required=False),),
    export_config={"hidden_act": "silu"},
    permute_qk=True,
)


def hparams(g: GGUFFile) -> HParams:
    return read_common(g, neox=False)
