"""Hostile and broken GGUF files: a GGUFError naming what and where, never a crash, hang or huge allocation."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llamba.errors import GGUFError
from llamba.formats.gguf import open_gguf
from tests.gguf_samples import write_sample


@pytest.fixture()
def sample(tmp_path):
    path = tmp_path / "sample.gguf"
    write_sample(path)
    return path


def _write(tmp_path, data: bytes):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    return path


def _tensor_info_offset(raw: bytes, name: str) -> int:
    """Byte offset of the tensor info whose name is `name` (its length prefix)."""
    encoded = name.encode()
    return raw.index(struct.pack("<Q", len(encoded)) + encoded)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(GGUFError, match="directory"):
        open_gguf(tmp_path)


def test_not_gguf(tmp_path):
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(_write(tmp_path, b"PK\x03\x04" + b"\0" * 100))


def test_empty_file(tmp_path):
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(_write(tmp_path, b""))


def test_unsupported_version(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    raw[4:8] = struct.pack("<I", 7)
    with pytest.raises(GGUFError, match="unsupported GGUF version 7"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_truncated_header_names_offset(tmp_path, sample):
    raw = sample.read_bytes()
    with pytest.raises(GGUFError, match=r"truncated file.*at byte \d+"):
        open_gguf(_write(tmp_path, raw[:400]))


def test_truncated_data_names_tensor(tmp_path, sample):
    raw = sample.read_bytes()
    with pytest.raises(GGUFError, match="tensor q.q8_0 .*past the end"):
        open_gguf(_write(tmp_path, raw[:-40]))  # past the alignment padding


def test_absurd_counts(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    raw[8:16] = struct.pack("<Q", 2**60)  # tensor count
    with pytest.raises(GGUFError, match="absurd counts"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_absurd_string_length(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    raw[24:32] = struct.pack("<Q", 2**62)  # length of the first key
    with pytest.raises(GGUFError, match="truncated file: key #0"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_absurd_array_count(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    key = b"t.arr_str"
    at = raw.index(key) + len(key) + 4 + 4  # past the key, its value type and the item type
    raw[at : at + 8] = struct.pack("<Q", 2**61)
    with pytest.raises(GGUFError, match="t.arr_str"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_bad_utf8_in_a_string_array(tmp_path, sample):
    raw = sample.read_bytes()
    at = raw.index("ünï".encode())
    with pytest.raises(GGUFError, match=r"t.arr_str\[2\] is not valid UTF-8"):
        open_gguf(_write(tmp_path, raw[:at] + b"\xff" + raw[at + 1 :]))


def test_unknown_tensor_type(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    at = _tensor_info_offset(bytes(raw), "t1.f32") + 8 + len("t1.f32") + 4 + 2 * 8  # name, n_dims, 2 dims
    raw[at : at + 4] = struct.pack("<I", 99)
    with pytest.raises(GGUFError, match="t1.f32 has unknown GGML type id 99"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_tensor_offset_past_end(tmp_path, sample):
    raw = bytearray(sample.read_bytes())
    at = _tensor_info_offset(bytes(raw), "t0.f32") + 8 + len("t0.f32") + 4 + 2 * 8 + 4
    raw[at : at + 8] = struct.pack("<Q", 1 << 40)
    with pytest.raises(GGUFError, match="t0.f32.*past the end"):
        open_gguf(_write(tmp_path, bytes(raw)))


def test_fuzz_mutations_never_crash(tmp_path, sample):
    """Seeded mutations and truncations: each either parses or raises GGUFError, quickly."""
    raw = sample.read_bytes()
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "error": 0}
    for trial in range(600):
        data = bytearray(raw)
        kind = trial % 4
        if kind == 0:  # flip random bytes, mostly in the header where lengths live
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(0, min(len(data), 600)))] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate anywhere
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 2:  # plant a huge little-endian number at a random 8-byte position
            at = int(rng.integers(0, min(len(data), 600) - 8))
            data[at : at + 8] = struct.pack("<Q", int(rng.integers(2**32, 2**63)))
        else:  # splice in random bytes
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        path = tmp_path / f"fuzz{trial % 8}.gguf"
        path.write_bytes(bytes(data))
        try:
            open_gguf(path)
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
    assert outcomes["error"] > 300  # the mutations really do break files, and each broke cleanly
