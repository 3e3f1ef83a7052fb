"""Hugging Face checkpoints: config.json, single or sharded safetensors, and the tokenizer files beside them.

Tensors are read one at a time through the `safetensors` package's NumPy interface (BF16 arrives as
`ml_dtypes.bfloat16`), so converting never holds more than one tensor of the model. Writing goes the other way
for `llamba export`: shards of at most `shard_bytes`, each written by `safetensors.numpy.save_file`, with the
`model.safetensors.index.json` Hugging Face reads sharded checkpoints through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' NumPy reader needs)
import numpy as np

from ..errors import LlambaError, UnsupportedError

INDEX_NAME = "model.safetensors.index.json"
READABLE_DTYPES = ("F32", "F16", "BF16")
EXPORT_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": ml_dtypes.bfloat16}


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a one-line error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlambaError(f"{path}: not found") from None
    except OSError as e:
        raise LlambaError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlambaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise LlambaError(f"{path}: expected a JSON object")
    return value


def read_optional_json(path: Path) -> dict:
    """read_json, or {} when the file is not there."""
    return read_json(path) if path.is_file() else {}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class HFCheckpoint:
    """A checkpoint folder: its config (the text model's, for multimodal wrappers) and its tensors by name."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LlambaError(f"{self.folder}: not a folder (give a Hugging Face checkpoint folder)")
        self.config = read_json(self.folder / "config.json")
        classes = self.config.get("architectures")
        if not (isinstance(classes, list) and classes and isinstance(classes[0], str)):
            raise LlambaError(f"{self.folder / 'config.json'}: no 'architectures' list")
        self.model_class = classes[0]
        self.tensors = self._index_tensors()

    def text_config(self) -> dict:
        """The language model's settings; multimodal checkpoints nest them under `text_config`."""
        nested = self.config.get("text_config")
        return {**self.config, **nested} if isinstance(nested, dict) else self.config

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LlambaError(f"{index}: no 'weight_map'")
            files = sorted({self.folder / str(f) for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LlambaError(f"{index}: shard {missing[0]} is missing ({len(missing)} of {len(files)} missing)")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise LlambaError(f"{self.folder}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
        return files

    def _index_tensors(self) -> dict[str, TensorEntry]:
        from safetensors import SafetensorError, safe_open

        entries: dict[str, TensorEntry] = {}
        for file in self._shard_files():
            try:
                with safe_open(file, framework="numpy") as f:
                    for name in f.keys():
                        view = f.get_slice(name)
                        entries[name] = TensorEntry(name, file, view.get_dtype(), tuple(view.get_shape()))
            except (SafetensorError, OSError) as e:
                raise LlambaError(f"{file}: not a readable safetensors file ({e})") from None
        return entries

    def read(self, entry: TensorEntry) -> np.ndarray:
        """One tensor as float32."""
        from safetensors import safe_open

        if entry.dtype not in READABLE_DTYPES:
            raise UnsupportedError(f"{entry.file.name}: tensor {entry.name} is {entry.dtype}; "
                                   f"supported: {', '.join(READABLE_DTYPES)}")
        with safe_open(entry.file, framework="numpy") as f:
            return f.get_tensor(entry.name).astype(np.float32, copy=False)


def _shards(tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    """The tensors grouped in order into shards of at most `shard_bytes` (a larger tensor is a shard alone)."""
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, array in tensors:
        if shard and size + array.nbytes > shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = np.ascontiguousarray(array)
        size += array.nbytes
    yield shard


def write_checkpoint(folder: Path, tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int) -> None:
    """Write (name, array) pairs as `model.safetensors`, or as shards with the index Hugging Face reads when
    they exceed `shard_bytes`. One shard is in memory at a time."""
    from safetensors.numpy import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(_shards(tensors, shard_bytes), 1):
        name = f"model-{number:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(a.nbytes for a in shard.values())
    names = sorted(set(weight_map.values())) or ["model-00001.safetensors"]
    if len(names) == 1:
        os.replace(folder / names[0], folder / "model.safetensors")
        return
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
