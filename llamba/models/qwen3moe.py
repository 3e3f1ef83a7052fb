"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the qwen3 layer (QK-norm, NEOX RoPE) with a mixture of
experts for every feed-forward block, no shared expert, the chosen experts' weights rescaled to sum to one."""

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from .hf import EXPERT_KEYS, EXPERT_NAMES, MOE_NAMES, HFSpec, check_every_layer_sparse
from .metadata import HParams, read_common, read_experts


def _check_config(config: dict, where: str) -> None:
    check_every_layer_sparse(config, where)
    if not config.get("norm_topk_prob", True):
        raise UnsupportedError(f"{where}: Qwen3-MoE with norm_topk_prob = false is not supported (llama.cpp "
                               "always normalizes its experts' weights)")


HF = HFSpec(
    arch="qwen3moe",
    classes=("Qwen3MoeForCausalLM",),
    model_type="qwen3_moe",
    keys=EXPERT_KEYS,
    export_config={"hidden_act": "silu", "norm_topk_prob": True},
    layer_names=MOE_NAMES,
    experts="mlp.experts",
    expert_names=EXPERT_NAMES,
    check_config=_check_config,
)


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.qk_norm = True
    return read_experts(g, hp, normalize=True)
