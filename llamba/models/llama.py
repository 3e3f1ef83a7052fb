"""The llama family: Llama 2/3.x, TinyLlama, SmolLM2, Mistral (and any `llama`-architecture GGUF).

RoPE on adjacent pairs (NORM): llama.cpp's converter permutes Q/K rows so the pairs line up.
"""

from ..formats.gguf import GGUFFile
from .metadata import HParams, read_common


def hparams(g: GGUFFile) -> HParams:
    return read_common(g, neox=False)
