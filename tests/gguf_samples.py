"""Small GGUF files written with the `gguf` package's writer, an implementation independent of ours."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_sample(path: Path, n_tensors: int = 3, seed: int = 0) -> dict:
    """A GGUF with every metadata value type (nested arrays too) and a few tensors; returns what went in."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld ✓")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, 1.5])
    w.add_array("t.arr_str", ["a", "", "ünï", "\n"])
    w.add_array("t.arr_str_nul", ["x\0y", "", "z"])  # a NUL inside a string: the reader's careful path
    w.add_array("t.arr_nested", [[1, 2], [3, 4, 5]])
    tensors = {}
    for i in range(n_tensors):
        values = rng.standard_normal((4, 64)).astype(np.float32)
        tensors[f"t{i}.f32"] = values
        w.add_tensor(f"t{i}.f32", values)
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q.q8_0", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    tensors["q.q8_0"] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
