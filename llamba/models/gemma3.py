"""Gemma 3: interleaved sliding-window and global attention layers with their own RoPE bases, QK-norm,
norms before and after both blocks, GELU-tanh FFN, embeddings scaled by sqrt(n_embd), tied output.

The norm weights in GGUF already include Gemma's "+1", so they are applied like any RMSNorm weight.
"""

import dataclasses
import math

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from .hf import ConfigKey, HFSpec
from .metadata import MAX_CONTEXT, HParams, arch_keys, read_common

SWA_PATTERN = 6  # five sliding-window layers, then one global one
LOCAL_ROPE_BASE = 10000.0


def _layer_types(n_layer: int) -> list[str]:
    return ["sliding_attention" if i % SWA_PATTERN < SWA_PATTERN - 1 else "full_attention" for i in range(n_layer)]


def _query_scale_width(n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    # Gemma 3 27B scales queries by the model width per head; the others by the head size.
    return n_embd / n_head if n_layer == 62 else head_dim


def _check_config(config: dict, where: str) -> None:
    """Refuse the Gemma 3 settings llamba's recipe fixes rather than reads."""
    n_layer, head_dim = config.get("num_hidden_layers"), config.get("head_dim", 256)
    fixed = {
        "rope_local_base_freq": (config.get("rope_local_base_freq", LOCAL_ROPE_BASE), LOCAL_ROPE_BASE),
        "sliding_window_pattern": (config.get("sliding_window_pattern", SWA_PATTERN), SWA_PATTERN),
    }
    if isinstance(n_layer, int) and "layer_types" in config:
        fixed["layer_types"] = (config["layer_types"], _layer_types(n_layer))
    if isinstance(n_layer, int) and "query_pre_attn_scalar" in config:
        width = _query_scale_width(n_layer, config.get("hidden_size", 0), config.get("num_attention_heads", 1), head_dim)
        fixed["query_pre_attn_scalar"] = (config["query_pre_attn_scalar"], width)
    for key, (value, supported) in fixed.items():
        if value != supported:
            raise UnsupportedError(f"{where}: Gemma 3 with {key} = {value!r} is not supported (llamba runs {supported!r})")


def _more_config(config: dict) -> dict:
    n_layer = config["num_hidden_layers"]
    width = _query_scale_width(n_layer, config["hidden_size"], config["num_attention_heads"], config.get("head_dim", 256))
    return {"rope_local_base_freq": LOCAL_ROPE_BASE, "sliding_window_pattern": SWA_PATTERN,
            "layer_types": _layer_types(n_layer), "query_pre_attn_scalar": width}


HF = HFSpec(
    arch="gemma3",
    classes=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    model_type="gemma3_text",
    layer_names={"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"},
    keys=(ConfigKey("attention.sliding_window", "sliding_window", required=False),
          ConfigKey("final_logit_softcapping", "final_logit_softcapping", float, required=False)),
    export_config={"hidden_activation": "gelu_pytorch_tanh"},
    norm_shift=1.0,
    renamed=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model.")),
    skipped=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    check_config=_check_config,
    more_config=_more_config,
)


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.qk_norm = True
    hp.post_norms = True
    hp.activation = "gelu"
    hp.embed_scale = math.sqrt(hp.n_embd)
    keys = arch_keys(g)
    hp.sliding_window = keys.count("attention.sliding_window", 0, low=0, high=MAX_CONTEXT)
    if hp.sliding_window:
        hp.swa_layers = [i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(hp.n_layer)]
        hp.rope_local = dataclasses.replace(hp.rope, base=LOCAL_ROPE_BASE, scaling="none", factor=1.0)
    else:
        hp.final_softcap = keys.real("final_logit_softcapping", 0.0)
    hp.attn_scale = 1.0 / math.sqrt(_query_scale_width(hp.n_layer, hp.n_embd, hp.n_head, hp.head_dim))
    return hp
