"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the qwen2 layer (QKV biases, NEOX RoPE) with a mixture of
experts for its feed-forward block: the router's softmax weights of the top experts as they are (not
rescaled), plus a shared expert, always run, scaled by a sigmoid gate of its own (`ffn_gate_inp_shexp`)."""

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from .hf import EXPERT_KEYS, EXPERT_NAMES, MOE_NAMES, SHARED_EXPERT_KEYS, HFSpec, check_every_layer_sparse
from .metadata import HParams, read_common, read_experts


def _check_config(config: dict, where: str) -> None:
    check_every_layer_sparse(config, where)
    if config.get("norm_topk_prob", False):
        raise UnsupportedError(f"{where}: Qwen2-MoE with norm_topk_prob = true is not supported (llama.cpp "
                               "runs its experts' weights unnormalized)")


HF = HFSpec(
    arch="qwen2moe",
    classes=("Qwen2MoeForCausalLM",),
    model_type="qwen2_moe",
    keys=EXPERT_KEYS + SHARED_EXPERT_KEYS,
    export_config={"hidden_act": "silu", "norm_topk_prob": False},
    layer_names=MOE_NAMES,
    experts="mlp.experts",
    expert_names=EXPERT_NAMES,
    check_config=_check_config,
)


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.shared_expert_gate = True
    return read_experts(g, hp, normalize=False, shared=True)
