"""`llamba export`: a GGUF file -> a Hugging Face checkpoint folder (config.json, safetensors of the dequantized
weights, the tokenizer files, tokenizer_config.json with the chat template).

It is `convert` run backwards through the same HFSpec, so a GGUF can go back to the Python ecosystem, and a
round trip through both is the converter's test. The folder is built under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import LlambaError, UnsupportedError
from ..formats.gguf import GGUFFile, open_gguf
from ..formats.hf import EXPORT_DTYPES, write_checkpoint
from ..formats.quants import dequantize
from ..models import export_spec
from ..models.hf import HFSpec, config_from_metadata, hf_expert_names, hf_name, weight_to_hf
from .vocab import special_ids, write_tokenizer
from .writer import Progress

SHARD_BYTES = 10**9  # shards are held in memory whole while written: 1 GB bounds the peak


def export(source: str | os.PathLike, folder: str | os.PathLike, dtype: str = "f32",
           progress: Progress | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the model in `source` as a Hugging Face checkpoint in `folder` (which must not hold files)."""
    if dtype not in EXPORT_DTYPES:
        raise LlambaError(f"export type {dtype!r} is not supported (supported: {', '.join(EXPORT_DTYPES)})")
    g = open_gguf(source)
    spec: HFSpec = export_spec(g)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise LlambaError(f"{folder}: exists and is not an empty folder; nothing was written")
    metadata = g.metadata
    if "rope_freqs.weight" in g.tensors:
        raise UnsupportedError(f"{g.path}: Llama 3.1-style RoPE frequency divisors (rope_freqs) cannot be exported")
    config = config_from_metadata(spec, metadata)
    config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    config["tie_word_embeddings"] = "output.weight" not in g.tensors
    config["torch_dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    config.update({f"{t}_token_id": i for t, i in special_ids(metadata).items()})
    temporary = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    temporary.mkdir(parents=True)
    try:
        (temporary / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        write_tokenizer(metadata, temporary)
        write_checkpoint(temporary, _weights(g, spec, EXPORT_DTYPES[dtype], progress), shard_bytes)
        if folder.exists():
            folder.rmdir()
        os.replace(temporary, folder)
    except OSError as e:
        shutil.rmtree(temporary, ignore_errors=True)
        raise LlambaError(f"{folder}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return folder


def _weights(g: GGUFFile, spec: HFSpec, dtype, progress: Progress | None) -> Iterator[tuple[str, np.ndarray]]:
    total = sum(t.n_elements for t in g.tensors.values()) * np.dtype(dtype).itemsize
    done = 0
    for i, (name, info) in enumerate(g.tensors.items()):
        if progress:
            progress(i, len(g.tensors), done, total, name)
        values = dequantize(info.data, info.type).reshape(tuple(reversed(info.shape)))
        if len(info.shape) == 3:  # a layer's experts, one Hugging Face tensor each
            for expert, expert_name in zip(values, hf_expert_names(spec, name, info.shape[2])):
                yield expert_name, weight_to_hf(spec, name, expert, g.metadata).astype(dtype)
        else:
            if name.endswith("ffn_gate_inp_shexp.weight"):  # a vector in GGUF, a one-row matrix in transformers
                values = values.reshape(1, -1)
            yield hf_name(spec, name), weight_to_hf(spec, name, values, g.metadata).astype(dtype)
        done += info.n_elements * np.dtype(dtype).itemsize
    if progress:
        progress(len(g.tensors), len(g.tensors), total, total, "")
