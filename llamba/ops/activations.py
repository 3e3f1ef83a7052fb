"""Gated feed-forward activations, fused with the gate product: out = act(gate) * up."""

from __future__ import annotations

import numpy as np

from .jit import kernel

_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_COEF = np.float32(0.044715)


@kernel
def swiglu(out, gate, up):
    """SiLU(gate) * up, elementwise over [n, d] arrays; out may alias either input."""
    n, d = gate.shape
    for t in range(n):
        for i in range(d):
            g = gate[t, i]
            out[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@kernel
def geglu_tanh(out, gate, up):
    """GELU (tanh approximation, as ggml and Gemma use) of gate, times up."""
    n, d = gate.shape
    for t in range(n):
        for i in range(d):
            g = gate[t, i]
            inner = _SQRT_2_OVER_PI * g * (np.float32(1.0) + _GELU_COEF * g * g)
            out[t, i] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)) * up[t, i]


@kernel
def softcap(x, cap):
    """x = cap * tanh(x / cap), in place over a 2-D array (Gemma 2 style logit soft-capping)."""
    n, d = x.shape
    for t in range(n):
        for i in range(d):
            x[t, i] = cap * np.tanh(x[t, i] / cap)
