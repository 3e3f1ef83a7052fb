"""The llama family: Llama 2/3.x, TinyLlama, SmolLM2, Mistral (and any `llama`-architecture GGUF), and
Mixtral: llama.cpp reads it as `llama` with `expert_count` > 0, its feed-forward blocks a mixture of experts
(`ffn_*_exps`, each expert feed_forward_length wide) whose chosen weights are rescaled to sum to one.

RoPE on adjacent pairs (NORM): llama.cpp's converter permutes Q/K rows so the pairs line up.
"""

from ..formats.gguf import GGUFFile
from .hf import ConfigKey, HFSpec
from .metadata import HParams, read_common, read_experts

HF = HFSpec(
    arch="llama",
    classes=("LlamaForCausalLM", "MistralForCausalLM"),
    model_type="llama",
    keys=(ConfigKey("vocab_size", "vocab_size", required=False),),
    export_config={"hidden_act": "silu"},
    permute_qk=True,
)
MIXTRAL_HF = HFSpec(
    arch="llama",
    classes=("MixtralForCausalLM",),
    model_type="mixtral",
    layer_names={"block_sparse_moe.gate": "ffn_gate_inp"},
    keys=(ConfigKey("vocab_size", "vocab_size", required=False), ConfigKey("expert_count", "num_local_experts"),
          ConfigKey("expert_used_count", "num_experts_per_tok")),
    export_config={"hidden_act": "silu"},
    permute_qk=True,
    experts="block_sparse_moe.experts",
    expert_names={"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"},
)
HF_SPECS = (HF, MIXTRAL_HF)


def hparams(g: GGUFFile) -> HParams:
    return read_experts(g, read_common(g, neox=False), normalize=True, split_ff=False)
