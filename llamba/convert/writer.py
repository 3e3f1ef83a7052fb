"""Writing a GGUF file one tensor at a time, through the `gguf` package's writer.

The plan (names, shapes, types) is written first, then each tensor is produced, quantized in slices of rows
and written before the next is read: memory stays near one tensor. The file is built under a temporary name
in the output's folder and renamed at the end, so a failure (a full disk, an interrupt, a bad tensor) never
leaves a half file under the name the user asked for.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlambaError
from ..formats.ggml_types import GGMLType
from ..formats.quants import quantize

SLICE_ELEMENTS = 1 << 22  # rows quantized together: ~16 MB of float32 and its temporaries
QUANTIZATION_VERSION = 2


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # NumPy order: [..., row length]
    type: GGMLType
    produce: Callable[[], np.ndarray]  # the float32 values, read only when the tensor is written

    @property
    def n_bytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return rows * self.type.row_bytes(self.shape[-1])


Progress = Callable[[int, int, int, int, str], None]  # tensors done, tensors, bytes done, bytes, name


def quantize_rows(values: np.ndarray, t: GGMLType) -> np.ndarray:
    """float32 [..., n] -> uint8 [rows, row_bytes], quantized a slice of rows at a time."""
    rows = values.reshape(-1, values.shape[-1])
    out = np.empty((rows.shape[0], t.row_bytes(rows.shape[1])), np.uint8)
    step = max(1, SLICE_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = quantize(rows[start:start + step], t.name)
    return out


def _add_value(writer, key: str, value, value_type) -> None:
    from gguf import GGUFValueType as VT

    if value_type is not None and value_type != VT.ARRAY:
        writer.add_key_value(key, value, value_type)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, np.ndarray):
        sub = {np.dtype(np.int32): VT.INT32, np.dtype(np.uint32): VT.UINT32, np.dtype(np.float32): VT.FLOAT32,
               np.dtype(np.int64): VT.INT64, np.dtype(np.uint8): VT.UINT8, np.dtype(np.int8): VT.INT8,
               np.dtype(np.float64): VT.FLOAT64, np.dtype(np.uint64): VT.UINT64}.get(value.dtype.newbyteorder("="))
        writer.add_key_value(key, value.tolist(), VT.ARRAY, sub)
    else:
        writer.add_array(key, list(value))


def write_gguf(path: str | os.PathLike, arch: str, metadata: dict, tensors: list[PlannedTensor],
               value_types: dict | None = None, special_vocab=None, progress: Progress | None = None) -> None:
    """Write `metadata` (key -> value; types from `value_types` or inferred) and `tensors` to `path`."""
    import gguf

    path = Path(path)
    if path.is_dir():
        raise LlambaError(f"{path}: is a folder; give the output file's name")
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(temporary, arch)
    value_types = value_types or {}
    try:
        for key, value in metadata.items():
            if key not in ("general.architecture", "GGUF.version"):
                _add_value(writer, key, value, value_types.get(key))
        if special_vocab is not None:
            special_vocab.add_to_gguf(writer, quiet=True)
        for t in tensors:
            writer.add_tensor_info(t.name, (*t.shape[:-1], t.type.row_bytes(t.shape[-1])), np.dtype(np.uint8),
                                   t.n_bytes, raw_dtype=gguf.GGMLQuantizationType(t.type.id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, tensors, progress)
        writer.close()
        os.replace(temporary, path)
    except OSError as e:
        _discard(writer, temporary)
        if e.errno == errno.ENOSPC:
            raise LlambaError(f"{path.parent}: the disk is full (nothing was written under {path.name})") from None
        raise LlambaError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        _discard(writer, temporary)
        raise


def _write_tensors(writer, tensors: list[PlannedTensor], progress: Progress | None) -> None:
    total = sum(t.n_bytes for t in tensors)
    done = 0
    for i, t in enumerate(tensors):
        if progress:
            progress(i, len(tensors), done, total, t.name)
        values = t.produce()
        if values.shape != t.shape:
            raise LlambaError(f"tensor {t.name}: shape {values.shape} differs from the planned {t.shape}")
        writer.write_tensor_data(quantize_rows(values, t.type))
        done += t.n_bytes
    if progress:
        progress(len(tensors), len(tensors), done, total, "")


def _discard(writer, temporary: Path) -> None:
    try:
        writer.close()
    except Exception:  # the writer may be half-open; the file is removed either way
        pass
    temporary.unlink(missing_ok=True)
