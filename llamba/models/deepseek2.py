"""DeepSeek-V2 / V2-Lite (and relatives in the same GGUF architecture): latent attention (models/latent.py)
with adjacent-pair RoPE on its rotary parts, and a mixture of experts after the leading dense layers: the
router's softmax weights of the top experts (rescaled to sum to one if expert_weights_norm), times
expert_weights_scale, plus ungated shared experts (expert_shared_count of them, as one FFN).

As llama.cpp does, a model of 26 or 27 layers (V2-Lite) projects Q straight from the input; any other needs
attention.q_lora_rank. The GGUF layout is llama.cpp's latent one: one key head of kv_lora_rank + n_rot
(attention.key_length), attn_k_b / attn_v_b split from Hugging Face's kv_b_proj, the uncompressed head sizes
in attention.key_length_mla / value_length_mla. DeepSeek-V3's routing (and Moonlight's): a sigmoid per
expert, the selection bias exp_probs_b, group-limited selection.

V2's group_limited_greedy runs as llama.cpp runs it: the same group-limited selection as V3's, each group
scored by the sum of its two best experts. (DeepSeek-V2's modeling code scores a group by its best expert
alone; the GGUF does not say which, and llama.cpp's rule is what a file is judged by here.) YaRN (the
released V2 and V3 use it) as llama.cpp reads it: see _yarn and ops/rope.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from ..ops.rope import RopeConfig, yarn_attention_scale
from .hf import EXPERT_NAMES, ConfigKey, HFSpec, rope_scaling_kind
from .latent import LatentDims
from .metadata import MAX_WIDTH, HParams, arch_keys, read_common, read_experts

LITE_LAYER_COUNTS = (26, 27)  # llama.cpp's test for a model without q_lora_rank
SOFTMAX, SIGMOID = 1, 2  # llama.cpp's expert_gating_func values (0: unset, softmax)


def hparams(g: GGUFFile) -> HParams:
    keys = arch_keys(g)
    if g.arch_value("attention.key_length_mla") is None:
        raise UnsupportedError(f"{g.path}: a DeepSeek2 file without attention.key_length_mla (attn_kv_b not split "
                               "into attn_k_b / attn_v_b) is not supported; convert the checkpoint again")
    hp = read_common(g, neox=False, latent=True)
    kv_lora = keys.count("attention.kv_lora_rank", high=MAX_WIDTH)
    n_rot = hp.rope.n_rot
    if hp.n_head_kv != 1:
        raise keys.fail("attention.head_count_kv", hp.n_head_kv, "must be 1 (latent attention is one key head)")
    if hp.head_dim != kv_lora + n_rot:
        raise keys.fail("attention.key_length", hp.head_dim,
                        f"must be kv_lora_rank + rope.dimension_count = {kv_lora + n_rot}")
    keys.count("attention.value_length", kv_lora, low=kv_lora, high=kv_lora)
    key_mla = keys.count("attention.key_length_mla", low=n_rot + 1, high=MAX_WIDTH)
    q_lora = 0 if hp.n_layer in LITE_LAYER_COUNTS else keys.count("attention.q_lora_rank", high=MAX_WIDTH)
    v_head = keys.count("attention.value_length_mla", high=MAX_WIDTH)
    hp.mla = LatentDims(q_lora, kv_lora, key_mla - n_rot, n_rot, v_head)
    hp.rope = _yarn(g, keys, hp.rope)
    hp.attn_scale = yarn_attention_scale(hp.rope) / math.sqrt(key_mla)
    read_experts(g, hp, normalize=keys.flag("expert_weights_norm", False), split_ff=False)
    if hp.n_expert:
        hp.expert_sigmoid = keys.count("expert_gating_func", SOFTMAX, low=0, high=SIGMOID) == SIGMOID
        hp.expert_groups = _expert_groups(keys, hp)
        hp.n_dense_lead = keys.count("leading_dense_block_count", 0, low=0, high=hp.n_layer)
        hp.n_ff_shexp = hp.n_ff_exp * keys.count("expert_shared_count", 0, low=0, high=hp.n_expert)
        hp.expert_weights_scale = keys.real("expert_weights_scale", 1.0, high=1e3, above_low=True)
    return hp


def _yarn(g: GGUFFile, keys, rope: RopeConfig) -> RopeConfig:
    """DeepSeek's YaRN as llama.cpp reads it: rope.scaling.yarn_log_multiplier holds 0.1 x mscale_all_dim
    (its converter's legacy), and mscale is taken to be mscale_all_dim (as in the released configs)."""
    if rope.scaling not in ("none", "yarn"):
        raise UnsupportedError(f"{g.path}: DeepSeek2 with RoPE scaling {rope.scaling!r} is not supported "
                               "(llamba runs 'none' and 'yarn')")
    log_mul = keys.real("rope.scaling.yarn_log_multiplier", 0.0, high=100.0)
    return dataclasses.replace(rope, yarn_mscale_all_dim=log_mul / 0.1)


def _expert_groups(keys, hp: HParams) -> tuple[int, int]:
    """(groups of experts, groups a token may use), checked as llama.cpp checks them."""
    n_group = keys.count("expert_group_count", 1, low=0, high=hp.n_expert) or 1
    if n_group == 1:
        return 1, 1
    if hp.n_expert % n_group:
        raise keys.fail("expert_group_count", n_group, f"does not divide expert_count = {hp.n_expert}")
    group_used = keys.count("expert_group_used_count", high=n_group)
    if group_used * (hp.n_expert // n_group) < hp.n_expert_used:
        raise keys.fail("expert_group_used_count", group_used,
                        f"groups hold fewer experts than expert_used_count = {hp.n_expert_used}")
    return n_group, group_used


# ------------------------------------------------------------------------------------------ Hugging Face

def _check_config(config: dict, where: str) -> None:
    refused = {
        "scoring_func": (config.get("scoring_func", "softmax"), ("softmax", "sigmoid")),
        "topk_method": (config.get("topk_method", "greedy"), ("greedy", "group_limited_greedy", "noaux_tc")),
        "moe_layer_freq": (config.get("moe_layer_freq", 1), (1,)),
        "rope_scaling": (rope_scaling_kind(config.get("rope_scaling")), (None, "yarn")),
    }
    for key, (value, supported) in refused.items():
        if value not in supported:
            runs = ", ".join(repr(v) for v in supported)
            raise UnsupportedError(f"{where}: DeepSeek with {key} = {value!r} is not supported yet "
                                   f"(llamba runs {runs})")


def _latent_metadata(config: dict) -> dict:
    """llama.cpp's latent layout: one key head [kv_lora_rank + n_rot], values the latent, and the
    uncompressed head sizes under *_mla."""
    kv_lora, n_rot = config["kv_lora_rank"], config["qk_rope_head_dim"]
    return {"attention.head_count_kv": 1, "attention.key_length": kv_lora + n_rot, "attention.value_length": kv_lora,
            "attention.key_length_mla": config["qk_nope_head_dim"] + n_rot,
            "attention.value_length_mla": config["v_head_dim"], "rope.dimension_count": n_rot,
            "expert_weights_norm": bool(config.get("norm_topk_prob", False)),
            "expert_gating_func": SIGMOID if config.get("scoring_func") == "sigmoid" else SOFTMAX,
            **_group_metadata(config), **_yarn_metadata(config)}


def _yarn_metadata(config: dict) -> dict:
    """mscale_all_dim as llama.cpp's converter stores it: 0.1 x it, as yarn_log_multiplier."""
    mscale_all_dim = (config.get("rope_scaling") or {}).get("mscale_all_dim")
    return {"rope.scaling.yarn_log_multiplier": 0.1 * float(mscale_all_dim)} if mscale_all_dim else {}


def _group_metadata(config: dict) -> dict:
    """Group-limited selection (topk_method group_limited_greedy: V2; noaux_tc: V3): the groups and the groups
    kept, as llama.cpp's converter writes them (plain greedy ignores the groups)."""
    n_group = config.get("n_group") or 1
    if config.get("topk_method") not in ("group_limited_greedy", "noaux_tc") or n_group == 1:
        return {}
    return {"expert_group_count": n_group, "expert_group_used_count": config["topk_group"]}


def _split_kv_b(name: str, shape: tuple, config: dict) -> list:
    """kv_b_proj [n_head * (nope + v_head), kv_lora] -> attn_k_b [n_head, kv_lora, nope] (transposed: it
    multiplies q_nope) and attn_v_b [n_head, v_head, kv_lora], as llama.cpp's converter splits it."""
    if not name.endswith(".attn_kv_b.weight"):
        return []
    n_head, nope, v_head = config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"]
    kv_lora = shape[1]
    per_head = lambda w: w.reshape(n_head, nope + v_head, kv_lora)  # noqa: E731
    stem = name[: -len("attn_kv_b.weight")]
    return [(stem + "attn_k_b.weight", (n_head, kv_lora, nope),
             lambda w: np.ascontiguousarray(per_head(w)[:, :nope].transpose(0, 2, 1))),
            (stem + "attn_v_b.weight", (n_head, v_head, kv_lora),
             lambda w: np.ascontiguousarray(per_head(w)[:, nope:]))]


HF = HFSpec(
    arch="deepseek2",
    classes=("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
    model_type="deepseek_v2",
    layer_names={"self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm",
                 "self_attn.q_b_proj": "attn_q_b", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
                 "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
                 "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
                 "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp",
                 "mlp.gate.e_score_correction": "exp_probs_b"},
    keys=(ConfigKey("vocab_size", "vocab_size", required=False),
          ConfigKey("attention.kv_lora_rank", "kv_lora_rank"),
          ConfigKey("attention.q_lora_rank", "q_lora_rank", required=False),
          ConfigKey("leading_dense_block_count", "first_k_dense_replace"),
          ConfigKey("expert_count", "n_routed_experts"),
          ConfigKey("expert_used_count", "num_experts_per_tok"),
          ConfigKey("expert_shared_count", "n_shared_experts"),
          ConfigKey("expert_feed_forward_length", "moe_intermediate_size"),
          ConfigKey("expert_weights_scale", "routed_scaling_factor", float)),
    export_config={"hidden_act": "silu"},
    check_config=_check_config,
    experts="mlp.experts",
    expert_names=EXPERT_NAMES,
    more_metadata=_latent_metadata,
    split_tensors=_split_kv_b,
)
