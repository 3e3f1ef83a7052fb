"""Which GGML type each tensor gets, for an output type or the q4_k_m preset.

Plain types put every 2-D weight in that type (as llama.cpp's converter does for --outtype q8_0). The preset
`q4_k_m` is llama-quantize's Q4_K_M mix (src/llama-quant.cpp): Q4_K throughout, Q6_K for the output
projection and, in the layers `use_more_bits` picks, for the value projections (attn_v, Phi-3's fused
attn_qkv, an unsplit attn_kv_b) and every down projection (ffn_down, and a mixture's ffn_down_exps and
ffn_down_shexp). A model of exactly 8 experts (Mixtral-8x7B's count) gets Q8_0 keys and values and Q5_K
attn_output. DeepSeek's split attn_k_b / attn_v_b are none of these: Q4_K. Norms, biases and other 1-D
tensors and the experts' routers stay F32. A row length that is not a whole number of blocks falls back as
llama.cpp falls back. (Not copied: the 70B-only and Falcon-only rules.)
"""

from __future__ import annotations

import re

from ..errors import UnsupportedError
from ..formats.ggml_types import GGMLType, ggml_type

PLAIN_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
PRESETS = ("q4_k_m",)
OUTPUT_TYPES = tuple(PLAIN_TYPES) + PRESETS

# llama.cpp's general.file_type for each (LLAMA_FTYPE_MOSTLY_*; a lone K type is the "_S" variant)
FILE_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 14,
                 "q5_k": 16, "q6_k": 18, "bf16": 32, "q4_k_m": 15}

# a row that is not whole super-blocks of 256: llama.cpp's replacement types
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block a GGUF tensor belongs to (None for token_embd, output, ...)."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def check_output_type(name: str) -> str:
    if name.lower() not in OUTPUT_TYPES:
        raise UnsupportedError(f"output type {name!r} is not supported (supported: {', '.join(OUTPUT_TYPES)})")
    return name.lower()


def tensor_type(output: str, name: str, shape: tuple[int, ...], n_layer: int, tied: bool,
                n_expert: int = 0) -> GGMLType:
    """The type of tensor `name` of NumPy shape `shape` in a file of output type `output` (of a model with
    n_expert experts per layer, 0 if dense)."""
    if len(shape) < 2 or name.endswith("norm.weight") or not name.endswith(".weight") or ".ffn_gate_inp" in name:
        # routers stay F32, as llama.cpp keeps them: an expert chosen differently changes the whole output
        return ggml_type("F32")
    wanted = PLAIN_TYPES.get(output) or _q4_k_m(name, n_layer, tied, n_expert)
    return _fitting(ggml_type(wanted), shape[-1])


# llama-quantize's value-like tensors (tensor_get_category, category_is_attn_v), found anywhere in the name
VALUE_LIKE = ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")


def _q4_k_m(name: str, n_layer: int, tied: bool, n_expert: int) -> str:
    """llama_tensor_get_type_impl's choices for Q4_K_M. It counts value-like tensors in file order where this
    takes the layer: the same, as every layer has at most one (and DeepSeek's split files none)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K"
    layer = layer_of(name)
    more_bits = layer is not None and use_more_bits(layer, n_layer)
    eight_experts = n_expert == 8  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if any(part in name for part in VALUE_LIKE):
        return "Q8_0" if eight_experts else "Q6_K" if more_bits else "Q4_K"
    if "attn_k.weight" in name and eight_experts:
        return "Q8_0"
    if "attn_output.weight" in name and eight_experts:
        return "Q5_K"
    if "ffn_down" in name and more_bits:  # ffn_down, ffn_down_exps, ffn_down_shexp alike
        return "Q6_K"
    return "Q4_K"


def _fitting(t: GGMLType, row_length: int) -> GGMLType:
    if row_length % t.block_elements == 0:
        return t
    fallback = ggml_type(K_FALLBACK.get(t.name, "F16"))
    return fallback if row_length % fallback.block_elements == 0 else ggml_type("F16")
