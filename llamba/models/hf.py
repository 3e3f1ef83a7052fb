"""Hugging Face <-> GGUF for the llama-like families: tensor names, config keys, and the few weight changes.

Each architecture module declares an `HFSpec`: the Hugging Face classes it converts, its names where they
differ from the common map below, its extra config keys, and whether its weights change on the way (llama's
Q/K row order, Gemma's "+1" norms). The converter and the exporter only read these specs; they know no
architecture themselves. Every mapping here runs both ways, so `export` is the inverse of `convert`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlambaError, UnsupportedError

# Hugging Face name inside `model.layers.N.` -> GGUF name inside `blk.N.` (each with .weight or .bias)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
# a mixture of experts' router and shared expert, as Qwen2-MoE / Qwen3-MoE / OLMoE name them
MOE_NAMES = {
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# one expert's matrices inside `mlp.experts.E.` -> the GGUF tensor stacking all the layer's experts
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


@dataclass(frozen=True)
class ConfigKey:
    """One hyperparameter: GGUF `{arch}.{gguf}` <-> config.json `hf`."""

    gguf: str
    hf: str
    kind: type = int  # int (uint32 in GGUF) or float (float32)
    required: bool = True


EXPERT_KEYS = (
    ConfigKey("expert_count", "num_experts"),
    ConfigKey("expert_used_count", "num_experts_per_tok"),
    ConfigKey("expert_feed_forward_length", "moe_intermediate_size"),
)
SHARED_EXPERT_KEYS = (ConfigKey("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),)


def check_every_layer_sparse(config: dict, where: str) -> None:
    """Refuse Qwen-MoE checkpoints with dense layers among the sparse ones (llama.cpp has no such layout)."""
    if config.get("decoder_sparse_step", 1) != 1 or config.get("mlp_only_layers"):
        raise UnsupportedError(f"{where}: dense layers between the expert layers (decoder_sparse_step, "
                               "mlp_only_layers) are not supported")


COMMON_KEYS = (
    ConfigKey("context_length", "max_position_embeddings"),
    ConfigKey("embedding_length", "hidden_size"),
    ConfigKey("block_count", "num_hidden_layers"),
    ConfigKey("feed_forward_length", "intermediate_size"),
    ConfigKey("attention.head_count", "num_attention_heads"),
    ConfigKey("attention.head_count_kv", "num_key_value_heads", required=False),
    ConfigKey("attention.layer_norm_rms_epsilon", "rms_norm_eps", float),
    ConfigKey("rope.freq_base", "rope_theta", float, required=False),
    ConfigKey("attention.key_length", "head_dim", required=False),
)


@dataclass(frozen=True)
class HFSpec:
    arch: str  # GGUF general.architecture
    classes: tuple[str, ...]  # Hugging Face `architectures` it converts; the first is written on export
    model_type: str  # config.json `model_type` on export
    layer_names: dict[str, str] = field(default_factory=dict)  # changes to LAYER_NAMES
    keys: tuple[ConfigKey, ...] = ()  # beyond COMMON_KEYS
    export_config: dict = field(default_factory=dict)  # fixed config.json values on export
    permute_qk: bool = False  # llama.cpp's llama pairs RoPE dimensions side by side: Q/K rows reordered
    norm_shift: float = 0.0  # added to every norm weight (Gemma stores w - 1; GGUF stores w)
    renamed: tuple[tuple[str, str], ...] = ()  # wrappers' prefixes of the text model -> the plain layout's
    skipped: tuple[str, ...] = ()  # prefixes of tensors that are not the text model (vision towers)
    check_config: Callable[[dict, str], None] | None = None  # refuses settings llamba cannot run
    more_config: Callable[[dict], dict] | None = None  # export: config.json values derived from metadata
    more_metadata: Callable[[dict], dict] | None = None  # convert: `{arch}.*` values derived from the config
    split_tensors: Callable[[str, tuple, dict], list] | None = None  # one tensor into several (DeepSeek's kv_b)
    experts: str = ""  # a mixture of experts: where they sit inside a layer ("mlp.experts")
    expert_names: dict[str, str] = field(default_factory=dict)  # an expert's matrices -> the stacked tensors

    @property
    def all_keys(self) -> tuple[ConfigKey, ...]:
        return COMMON_KEYS + self.keys

    @property
    def names(self) -> dict[str, str]:
        return {**LAYER_NAMES, **self.layer_names}


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(.+)\.experts\.(\d+)\.(.+)\.weight$")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(spec: HFSpec, name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor; None for tensors that are not the text model's."""
    for prefix, plain in spec.renamed:
        if name.startswith(prefix):
            name = plain + name[len(prefix):]
            break
    if name.startswith(spec.skipped) or name.endswith("rotary_emb.inv_freq"):
        return None
    if name.endswith(".e_score_correction_bias"):  # DeepSeek-V3's one tensor named without a .bias
        name = name[: -len("_bias")] + ".bias"
    if m := _LAYER.match(name):
        layer, part, suffix = m.groups()
        if part in spec.names:
            return f"blk.{layer}.{spec.names[part]}.{suffix}"
    else:
        stem, _, suffix = name.rpartition(".")
        if stem in TOP_NAMES and suffix in ("weight", "bias"):
            return f"{TOP_NAMES[stem]}.{suffix}"
    raise UnsupportedError(f"tensor {name} has no GGUF name for {spec.arch} (is this checkpoint a {spec.classes[0]}?)")


def expert_slot(spec: HFSpec, name: str) -> tuple[str, int] | None:
    """(the GGUF tensor stacking it, its expert index) for one expert's matrix; None for other tensors."""
    m = _EXPERT.match(name)
    if m is None or not spec.experts or f"{m[2]}.experts" != spec.experts or m[4] not in spec.expert_names:
        return None
    return f"blk.{m[1]}.{spec.expert_names[m[4]]}.weight", int(m[3])


def hf_expert_names(spec: HFSpec, name: str, n_expert: int) -> list[str]:
    """The inverse of expert_slot: each expert's Hugging Face name for a stacked GGUF tensor."""
    m = _BLOCK.match(name)
    back = {v: k for k, v in spec.expert_names.items()}
    if m is None or m[2] not in back:
        raise UnsupportedError(f"tensor {name} has no Hugging Face name for {spec.arch}")
    return [f"model.layers.{m[1]}.{spec.experts}.{e}.{back[m[2]]}.weight" for e in range(n_expert)]


def hf_name(spec: HFSpec, name: str) -> str:
    """The inverse of gguf_name (always the plain `model.` layout)."""
    if m := _BLOCK.match(name):
        layer, part, suffix = m.groups()
        back = {v: k for k, v in spec.names.items()}
        if part in back:
            return f"model.layers.{layer}.{back[part]}.{suffix}"
    else:
        stem, _, suffix = name.rpartition(".")
        back = {v: k for k, v in TOP_NAMES.items()}
        if stem in back:
            return f"{back[stem]}.{suffix}"
    raise UnsupportedError(f"tensor {name} has no Hugging Face name for {spec.arch}")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head reordered from halves (Hugging Face's rotate_half) to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(name: str, metadata: dict, arch: str) -> int | None:
    n_head = metadata[f"{arch}.attention.head_count"]
    if ".attn_q." in name:
        return n_head
    if ".attn_k." in name:
        return metadata.get(f"{arch}.attention.head_count_kv", n_head)
    return None


def weight_to_gguf(spec: HFSpec, name: str, w: np.ndarray, metadata: dict) -> np.ndarray:
    """A Hugging Face weight as GGUF holds it (`name` is the GGUF name, `metadata` what convert writes)."""
    if spec.permute_qk and (heads := _qk_heads(name, metadata, spec.arch)):
        w = _permute(w, heads)
    if spec.norm_shift and name.endswith("norm.weight"):
        w = w + np.float32(spec.norm_shift)
    return w


def weight_to_hf(spec: HFSpec, name: str, w: np.ndarray, metadata: dict) -> np.ndarray:
    """The inverse of weight_to_gguf."""
    if spec.permute_qk and (heads := _qk_heads(name, metadata, spec.arch)):
        w = _unpermute(w, heads)
    if spec.norm_shift and name.endswith("norm.weight"):
        w = w - np.float32(spec.norm_shift)
    return w


# ------------------------------------------------------------------------------------------ config keys

def _config_value(config: dict, key: ConfigKey, where: str):
    value = config.get(key.hf)
    if value is None:
        if key.required:
            raise LlambaError(f"{where}: '{key.hf}' is missing")
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok or (key.kind is int and value != int(value)):
        raise LlambaError(f"{where}: '{key.hf}' = {value!r} is not a valid {key.kind.__name__}")
    return key.kind(value)


def metadata_from_config(spec: HFSpec, config: dict, where: str = "config.json") -> dict:
    """GGUF `{arch}.*` metadata from a Hugging Face config."""
    if spec.check_config:
        spec.check_config(config, where)
    out = {}
    for key in spec.all_keys:
        value = _config_value(config, key, where)
        if value is not None:
            out[f"{spec.arch}.{key.gguf}"] = value
    arch = spec.arch
    head_dim = out.get(f"{arch}.attention.key_length")
    if head_dim is None:
        head_dim = out[f"{arch}.embedding_length"] // out[f"{arch}.attention.head_count"]
    else:
        out[f"{arch}.attention.value_length"] = head_dim
    rotated = config.get("partial_rotary_factor", 1.0)  # Phi-4-mini rotates three quarters of each head
    if not isinstance(rotated, (int, float)) or not 0 < rotated <= 1:
        raise LlambaError(f"{where}: 'partial_rotary_factor' = {rotated!r} is not in (0, 1]")
    out[f"{arch}.rope.dimension_count"] = int(head_dim * rotated)
    out.update(_rope_scaling(arch, config.get("rope_scaling"), where))
    if spec.more_metadata:
        out.update({f"{arch}.{key}": value for key, value in spec.more_metadata(config).items()})
    return out


def rope_scaling_kind(scaling) -> str | None:
    """A config's rope_scaling type (rope_type, or the older type), None without one."""
    return scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None


def _rope_scaling(arch: str, scaling, where: str) -> dict:
    if not scaling:
        return {}
    kind = rope_scaling_kind(scaling)
    if kind in ("default", "llama3"):  # llama3: frequency divisors in the rope_freqs tensor (generated_tensors)
        return {}
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"{where}: rope_scaling {kind!r} is not supported by the converter (linear, yarn, llama3)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or not factor > 0:
        raise LlambaError(f"{where}: rope_scaling.factor = {factor!r} is not a positive number")
    out = {f"{arch}.rope.scaling.type": kind, f"{arch}.rope.scaling.factor": float(factor)}
    original = scaling.get("original_max_position_embeddings")
    if kind == "yarn" and isinstance(original, int):
        out[f"{arch}.rope.scaling.original_context_length"] = original
    if kind == "yarn":  # what llama.cpp's converter writes too (its llama, qwen2 and deepseek2 read the defaults)
        out |= {f"{arch}.rope.scaling.{key}": float(scaling[hf]) for hf, key in YARN_KEYS.items()
                if isinstance(scaling.get(hf), (int, float))}
    return out


# YaRN's settings in a rope_scaling -> GGUF rope.scaling.* (attention_factor wins over attn_factor, as there)
YARN_KEYS = {"extrapolation_factor": "yarn_ext_factor", "attn_factor": "yarn_attn_factor",
             "attention_factor": "yarn_attn_factor", "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}


def generated_tensors(config: dict, metadata: dict, arch: str) -> dict[str, np.ndarray]:
    """Tensors GGUF has and the checkpoint does not: Llama 3.1's per-frequency RoPE divisors (`rope_freqs`),
    computed from its rope_scaling as llama.cpp's converter does."""
    scaling = config.get("rope_scaling")
    if rope_scaling_kind(scaling) != "llama3":
        return {}
    n_rot = metadata[f"{arch}.rope.dimension_count"]
    base = metadata.get(f"{arch}.rope.freq_base", 10000.0)
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    divisors = []
    for freq in 1.0 / base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot):
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:  # fast dimensions keep their frequency
            divisors.append(1.0)
        elif wavelength > original / low:  # slow ones are stretched by the whole factor
            divisors.append(factor)
        else:  # and between, a smooth blend
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.asarray(divisors, np.float32)}


def config_from_metadata(spec: HFSpec, metadata: dict) -> dict:
    """The inverse of metadata_from_config: config.json values from GGUF metadata."""
    arch = spec.arch
    config: dict = {"architectures": [spec.classes[0]], "model_type": spec.model_type, **spec.export_config}
    for key in spec.all_keys:
        value = metadata.get(f"{arch}.{key.gguf}")
        if value is not None:
            config[key.hf] = key.kind(value)
    if f"{arch}.rope.dimension_count" in metadata:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        if metadata[f"{arch}.rope.dimension_count"] != head_dim:
            raise UnsupportedError("partial RoPE (rope.dimension_count below the head size) cannot be exported")
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": kind, "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if kind == "yarn" and original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif kind != "none":
        raise UnsupportedError(f"RoPE scaling {kind!r} cannot be exported")
    if spec.more_config:
        config.update(spec.more_config(config))
    return config
