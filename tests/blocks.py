"""Random GGML blocks whose float16 scale fields are finite and sensibly sized."""

from __future__ import annotations

import numpy as np

from llamba.formats.ggml_types import ggml_type


def random_blocks(name: str, rng, n_blocks: int) -> np.ndarray:
    """Random block bytes, with every float16 field a finite, sensibly sized number."""
    t = ggml_type(name)
    if name in ("F32", "F16"):
        return rng.standard_normal((n_blocks, 64)).astype("<f4" if name == "F32" else "<f2").view(np.uint8)
    if name == "BF16":
        return (rng.standard_normal((n_blocks, 64)).astype(np.float32).view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, t.block_bytes), dtype=np.uint8)
    f16_fields = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
                  "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
    for at in f16_fields.get(name, []):
        raw[:, at : at + 2] = rng.uniform(-2, 2, (n_blocks, 1)).astype("<f2").view(np.uint8)
    if name == "Q8_K":
        raw[:, :4] = rng.uniform(-1, 1, (n_blocks, 1)).astype("<f4").view(np.uint8)
    return raw
