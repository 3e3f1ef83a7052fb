"""The GGUF reader against the `gguf` package's GGUFReader: every key, value, and tensor must agree."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from llamba.formats.gguf import open_gguf
from tests.gguf_samples import write_sample


def _flatten(value):
    """GGUFReader flattens arrays of arrays into one list; flatten ours the same way to compare."""
    if isinstance(value, list) and value and isinstance(value[0], (list, np.ndarray)):
        return [x for part in value for x in _flatten(part)]
    return list(value) if isinstance(value, (list, np.ndarray)) else value


def _same_value(ours, theirs) -> bool:
    if isinstance(ours, list) and ours and isinstance(ours[0], (list, np.ndarray)):
        return _flatten(ours) == list(theirs)
    if isinstance(ours, np.ndarray):
        return np.array_equal(ours, np.asarray(theirs))
    if isinstance(ours, list):
        return len(ours) == len(theirs) and all(_same_value(a, b) for a, b in zip(ours, theirs))
    return ours == theirs and type(ours) is type(theirs) or (isinstance(ours, float) and np.float32(ours) == np.float32(theirs))


def assert_matches_gguf_reader(path) -> None:
    ours = open_gguf(path)
    ref = GGUFReader(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref_fields)
    for key, field in ref_fields.items():
        assert ours.value_types[key] == field.types[0], key
        assert _same_value(ours.metadata[key], field.contents()), key
    assert ours.version == ref.fields["GGUF.version"].contents()
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type.id == t.tensor_type.value, t.name
        assert mine.shape == tuple(int(d) for d in t.shape), t.name
        assert mine.n_bytes == t.n_bytes, t.name
        assert mine.offset == t.data_offset, t.name
        assert mine.data.shape == t.data.shape, t.name
        assert np.array_equal(mine.data.view(np.uint8), t.data.view(np.uint8)), t.name


def test_reader_matches_gguf_reader_on_sample(tmp_path):
    path = tmp_path / "sample.gguf"
    write_sample(path)
    assert_matches_gguf_reader(path)


def test_reader_values_on_sample(tmp_path):
    path = tmp_path / "sample.gguf"
    tensors = write_sample(path)
    g = open_gguf(path)
    assert g.get("t.u64") == 2**63 + 5 and g.get("t.i8") == -100 and g.get("t.bool") is True
    assert g.get("t.str") == "héllo wörld ✓"
    assert g.get("t.arr_str") == ["a", "", "ünï", "\n"]
    assert [a.tolist() for a in g.get("t.arr_nested")] == [[1, 2], [3, 4, 5]]
    for name, values in tensors.items():
        assert np.array_equal(g.tensor(name).data, values)
    assert not g.tensor("t0.f32").data.flags.writeable  # a view into the read-only map, not a copy


def test_reader_accepts_version_2(tmp_path):
    path = tmp_path / "v2.gguf"
    write_sample(path)
    raw = bytearray(path.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the layout; v3 only added big-endian files
    path.write_bytes(bytes(raw))
    assert open_gguf(path).version == 2


@pytest.mark.slow
def test_reader_matches_gguf_reader_on_models(model_path):
    assert_matches_gguf_reader(model_path)
