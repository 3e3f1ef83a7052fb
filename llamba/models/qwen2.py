"""Qwen2 / Qwen2.5: the llama recipe with biases on Q, K and V, and half-split (NEOX) RoPE."""

from ..formats.gguf import GGUFFile
from .metadata import HParams, read_common


def hparams(g: GGUFFile) -> HParams:
    return read_common(g, neox=True)  # the biases are picked up from the attn_{q,k,v}.bias tensors
