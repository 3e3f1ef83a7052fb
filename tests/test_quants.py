"""Block formats against the `gguf` package's quants module (bit for bit) and independent NumPy checks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llamba.formats import quants
from llamba.formats.ggml_types import QK_K, ggml_type
from llamba.formats.gguf import open_gguf
from tests.blocks import random_blocks

ORACLE_DEQUANTIZABLE = [n for n in quants.DEQUANTIZABLE if n != "Q8_K"]  # gguf has no Q8_K dequantizer
EXACT_QUANTIZERS = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# K-quants: relative RMS error on Gaussian data, bounded by their bits per weight (a uniform quantizer with
# b bits over a +-2.5 sigma range has relative RMS error 5 / (2**b - 1) / sqrt(12), plus scale rounding).
K_QUANT_BITS = {"Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("name", ORACLE_DEQUANTIZABLE)
def test_dequantize_matches_gguf_onrandom_blocks(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    raw = random_blocks(name, rng, 64).reshape(8, -1)
    expected = gguf_quants.dequantize(raw, GGMLQuantizationType(ggml_type(name).id))
    assert _bits_equal(quants.dequantize(raw, name), expected)


def test_dequantize_q8_k_against_its_definition():
    rng = np.random.default_rng(8)
    raw = random_blocks("Q8_K", rng, 16)
    d = raw[:, :4].copy().view("<f4")
    q = raw[:, 4 : 4 + QK_K].view(np.int8).astype(np.float32)
    assert _bits_equal(quants.dequantize(raw, "Q8_K"), d * q)


@pytest.mark.parametrize("name", EXACT_QUANTIZERS)
def test_quantize_matches_gguf(name):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.001, 10, (16, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scales of zero must not divide
    x[1, 5] = 1e4  # an outlier
    ours = quants.quantize(x, name)
    theirs = gguf_quants.quantize(x, GGMLQuantizationType(ggml_type(name).id))
    assert np.array_equal(ours, np.ascontiguousarray(theirs).view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("name", list(K_QUANT_BITS))
def test_k_quant_round_trip_error(name):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, QK_K)) * rng.uniform(0.01, 5, (64, 1))).astype(np.float32)
    packed = quants.quantize(x, name)
    assert packed.shape == (64, ggml_type(name).block_bytes)
    back = quants.dequantize(packed, name)
    # The bytes we write decode identically with gguf's dequantizer: the layout is ggml's.
    assert _bits_equal(back, gguf_quants.dequantize(packed, GGMLQuantizationType(ggml_type(name).id)))
    bound = 5 / (2 ** K_QUANT_BITS[name] - 1) / np.sqrt(12) * 1.25
    rel_rms = np.sqrt(((back - x) ** 2).mean(axis=-1) / (x**2).mean(axis=-1))
    assert rel_rms.max() < bound, (rel_rms.max(), bound)
    assert np.allclose(quants.dequantize(quants.quantize(np.zeros((1, QK_K), np.float32), name), name), 0)


def test_unsupported_types_are_clear_errors():
    from llamba.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        quants.dequantize(np.zeros((1, 66), np.uint8), "IQ2_XXS")
    with pytest.raises(UnsupportedError, match="Q2_K"):
        quants.quantize(np.zeros((1, 256), np.float32), "Q2_K")


@pytest.mark.slow
def test_dequantize_every_tensor_of_the_models(model_path):
    g = open_gguf(model_path)
    for t in g.tensors.values():
        qtype = GGMLQuantizationType(t.type.id)
        for rows in np.array_split(t.data.reshape(-1, t.data.shape[-1]), max(1, t.n_bytes >> 26)):
            assert _bits_equal(quants.dequantize(rows, t.type), gguf_quants.dequantize(rows, qtype)), t.name
