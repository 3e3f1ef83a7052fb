"""`llamba quantize`: a GGUF file -> the same model with its weights in another type (or the q4_k_m preset).

Metadata is copied with its value types; each tensor is dequantized and quantized again, one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..formats.gguf import open_gguf
from ..formats.quants import dequantize
from .types import FILE_TYPE_IDS, check_output_type, tensor_type
from .writer import PlannedTensor, Progress, write_gguf


def requantize(source: str | os.PathLike, out: str | os.PathLike, output_type: str,
               progress: Progress | None = None) -> Path:
    output_type = check_output_type(output_type)
    g = open_gguf(source)
    metadata = dict(g.metadata)
    metadata["general.file_type"] = FILE_TYPE_IDS[output_type]
    value_types = dict(g.value_types)
    value_types.pop("general.file_type", None)
    n_layer = int(g.arch_value("block_count", 0))
    tied = "output.weight" not in g.tensors
    n_expert = int(g.arch_value("expert_count", 0))
    plan = []
    for name, info in g.tensors.items():
        shape = tuple(reversed(info.shape))
        produce = lambda info=info, shape=shape: dequantize(info.data, info.type).reshape(shape)  # noqa: E731
        kind = tensor_type(output_type, name, shape, n_layer, tied, n_expert)
        plan.append(PlannedTensor(name, shape, kind, produce))
    write_gguf(out, g.architecture, metadata, plan, value_types=value_types, progress=progress)
    return Path(out)
