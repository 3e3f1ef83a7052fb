"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the llama layer with Q, K and V fused in one matrix (`attn_qkv`), gate
and up fused in `ffn_up` (gate rows first), half-split (NEOX) RoPE over the first rope.dimension_count
dimensions of each head (Phi-4-mini: three quarters). llama.cpp runs Phi-3's sliding window as full
attention, and so does llamba; the long-context variants' per-frequency factors are not supported."""

from ..errors import UnsupportedError
from ..formats.gguf import GGUFFile
from .hf import HFSpec
from .metadata import HParams, read_common


def _check_config(config: dict, where: str) -> None:
    if config.get("rope_scaling"):
        raise UnsupportedError(f"{where}: Phi-3 with rope_scaling (the long-context variants) is not supported")


HF = HFSpec(
    arch="phi3",
    classes=("Phi3ForCausalLM",),
    model_type="phi3",
    layer_names={"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
    export_config={"hidden_act": "silu"},
    check_config=_check_config,
)


def hparams(g: GGUFFile) -> HParams:
    if "rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors:
        raise UnsupportedError(f"{g.path}: Phi-3's long-context RoPE factors (rope_factors_long) are not supported")
    hp = read_common(g, neox=True)
    hp.fused_gate_up = True
    return hp
