"""`llamba convert`: a Hugging Face checkpoint folder -> one GGUF file, streamed tensor by tensor.

The architecture module's `HFSpec` (found by the config's class name) supplies the names, the config keys
and the weight changes; this module only plans the file and streams the tensors through the writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LlambaError
from ..formats.hf import HFCheckpoint
from ..models import hf_spec
from ..models.hf import expert_slot, generated_tensors, gguf_name, metadata_from_config, weight_to_gguf
from .types import FILE_TYPE_IDS, check_output_type, layer_of, tensor_type
from .vocab import read_vocab
from .writer import QUANTIZATION_VERSION, PlannedTensor, Progress, write_gguf

def _order(name: str) -> tuple:
    """token_embd, the blocks in order, then the output tensors (llama.cpp's order)."""
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def convert(folder: str | os.PathLike, out: str | os.PathLike, output_type: str = "f16",
            progress: Progress | None = None) -> Path:
    """Convert the checkpoint in `folder` to `out` with tensors of `output_type` (see convert.types)."""
    output_type = check_output_type(output_type)
    checkpoint = HFCheckpoint(folder)
    where = str(checkpoint.folder / "config.json")
    spec = hf_spec(checkpoint.model_class, where)
    config = checkpoint.text_config()
    metadata = {"general.name": checkpoint.folder.name, **metadata_from_config(spec, config, where)}
    named, experts = {}, {}
    for entry in checkpoint.tensors.values():
        if slot := expert_slot(spec, entry.name):
            name, e = slot
            experts.setdefault(name, {})[e] = entry
        elif (name := gguf_name(spec, entry.name)) is not None:
            named[name] = entry
    if "token_embd.weight" not in named:
        raise LlambaError(f"{checkpoint.folder}: no token embeddings (model.embed_tokens.weight)")
    n_vocab = int(config.get("vocab_size") or named["token_embd.weight"].shape[0])
    vocab, special_vocab = read_vocab(checkpoint.folder, n_vocab)
    metadata.update(vocab)
    metadata["general.file_type"] = FILE_TYPE_IDS[output_type]
    metadata["general.quantization_version"] = QUANTIZATION_VERSION
    n_layer = metadata[f"{spec.arch}.block_count"]
    tied = "output.weight" not in named
    plan = []
    n_expert = metadata.get(f"{spec.arch}.expert_count", 0)
    producers = {}
    for name, entry in named.items():
        split = spec.split_tensors(name, tuple(entry.shape), config) if spec.split_tensors else []
        for part, shape, take in split:
            producers[part] = (shape, lambda entry=entry, take=take: take(checkpoint.read(entry)))
        if not split:
            producers[name] = _producer(spec, checkpoint, name, entry, metadata)
    for name, members in experts.items():
        producers[name] = _stacked(spec, checkpoint, name, members, n_expert, metadata)
    for name in sorted(producers, key=_order):
        shape, produce = producers[name]
        plan.append(PlannedTensor(name, shape, tensor_type(output_type, name, shape, n_layer, tied, n_expert),
                                  produce))
    for name, values in generated_tensors(config, metadata, spec.arch).items():
        kind = tensor_type(output_type, name, values.shape, n_layer, tied, n_expert)
        plan.append(PlannedTensor(name, values.shape, kind, lambda values=values: values))
    write_gguf(out, spec.arch, metadata, plan, special_vocab=special_vocab, progress=progress)
    return Path(out)


def _producer(spec, checkpoint: HFCheckpoint, name: str, entry, metadata: dict):
    """(shape, produce) of one GGUF tensor from one checkpoint tensor. A router's [1, n_embd] gate (Qwen2-MoE's
    shared expert) becomes the vector llama.cpp reads."""
    shape = tuple(entry.shape)
    squeeze = name.endswith("ffn_gate_inp_shexp.weight")
    if squeeze:
        shape = shape[1:]

    def produce():
        values = weight_to_gguf(spec, name, checkpoint.read(entry), metadata)
        return values.reshape(shape) if squeeze else values

    return shape, produce


def _stacked(spec, checkpoint: HFCheckpoint, name: str, members: dict, n_expert: int, metadata: dict):
    """(shape, produce) of a layer's experts stacked as GGUF holds them, [n_expert, rows, cols]; every
    expert 0 .. n_expert - 1 must be there, all of one shape."""
    shapes = {tuple(entry.shape) for entry in members.values()}
    if sorted(members) != list(range(n_expert)) or len(shapes) != 1:
        found = ", ".join(str(e) for e in sorted(members))
        raise LlambaError(f"{checkpoint.folder}: the experts of {name} do not match the config's {n_expert} "
                          f"(found experts {found} of shapes {sorted(shapes)})")
    (shape,) = shapes

    def produce():
        return np.stack([weight_to_gguf(spec, name, checkpoint.read(members[e]), metadata) for e in range(n_expert)])

    return (n_expert, *shape), produce
