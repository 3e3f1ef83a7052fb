"""Gated feed-forward activations, out = act(gate) * up, and logit soft-capping.

These are NumPy, not Numba, on purpose: Numba calls the scalar libm exp/tanh per element (no SVML here),
while NumPy's own SIMD exp/tanh run 10-15x faster on these arrays (measured: GELU on 128 x 2048, 0.31 ms
against 4.4 ms).
"""

from __future__ import annotations

import numpy as np

_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_COEF = np.float32(0.044715)
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


def swiglu(out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up, elementwise; out must not alias gate or up."""
    np.negative(gate, out=out)
    with np.errstate(over="ignore"):  # exp(-gate) overflowing to inf gives SiLU's limit 0, as it should
        np.exp(out, out=out)
    out += _ONE
    np.divide(gate, out, out=out)
    out *= up
    return out


def geglu_tanh(out: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation, as ggml and Gemma use) of gate, times up; out must not alias the inputs."""
    np.multiply(gate, gate, out=out)
    out *= _GELU_COEF
    out += _ONE
    out *= gate
    out *= _SQRT_2_OVER_PI
    np.tanh(out, out=out)
    out += _ONE
    out *= gate
    out *= _HALF
    out *= up
    return out


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """x = cap * tanh(x / cap), in place (Gemma 2 style logit soft-capping)."""
    x /= np.float32(cap)
    np.tanh(x, out=x)
    x *= np.float32(cap)
    return x
