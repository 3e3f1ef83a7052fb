"""OLMoE (OLMoE-1B-7B): a llama-like layer with NEOX RoPE whose Q and K are each RMS-normed as a whole (not
per head) before RoPE, and a mixture of experts in every feed-forward block (each expert feed_forward_length
wide, the chosen experts' softmax weights as they are, no shared expert)."""

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from .hf import EXPERT_NAMES, MOE_NAMES, ConfigKey, HFSpec
from .metadata import HParams, read_common, read_experts


def _check_config(config: dict, where: str) -> None:
    if config.get("norm_topk_prob", False):
        raise UnsupportedError(f"{where}: OLMoE with norm_topk_prob = true is not supported (llama.cpp runs its "
                               "experts' weights unnormalized)")
    if config.get("clip_qkv") is not None:
        raise UnsupportedError(f"{where}: OLMoE with clip_qkv is not supported")


HF = HFSpec(
    arch="olmoe",
    classes=("OlmoeForCausalLM",),
    model_type="olmoe",
    layer_names=MOE_NAMES,
    keys=(ConfigKey("expert_count", "num_experts"), ConfigKey("expert_used_count", "num_experts_per_tok")),
    export_config={"hidden_act": "silu", "norm_topk_prob": False},
    check_config=_check_config,
    experts="mlp.experts",
    expert_names=EXPERT_NAMES,
)


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.qk_norm = "whole"
    return read_experts(g, hp, normalize=False, split_ff=False)
