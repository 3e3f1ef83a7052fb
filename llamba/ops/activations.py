"""Gated feed-forward activations, out = act(gate) * up, and logit soft-capping.

The gated ones are Numba loops over each token's gate and up halves, their exponential jit.softmax_exp's
(vectorizing arithmetic within 3 ulp; Numba's own exp calls scalar libm per element). NumPy's SIMD ufuncs
were as fast per element, but five of them per call, over strided halves, took 6-40 us a layer: 0.2 ms of
a 5.5 ms SmolLM2 token, 0.7 ms of an 8-token batch. Each element is computed alone, in a fixed order, so a
token's activations do not depend on the batch around it.
"""

from __future__ import annotations

import numpy as np

from .jit import exact_kernel, softmax_exp

_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_GELU_COEF = np.float32(0.044715)
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


def swiglu(out: np.ndarray, gate_up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up for gate_up [n, 2 * n_ff] (gate, then up) into out [n, n_ff]."""
    _swiglu(out, np.ascontiguousarray(gate_up))
    return out


def geglu_tanh(out: np.ndarray, gate_up: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation, as ggml and Gemma use) of gate, times up; gate_up and out as in swiglu."""
    _geglu_tanh(out, np.ascontiguousarray(gate_up))
    return out


@exact_kernel(ieee_division=True)
def _swiglu(out, gate_up):
    n_ff = np.uint64(out.shape[1])  # unsigned indices: no negative-index wrap-around, which stops SIMD
    for t in range(out.shape[0]):
        row, done = gate_up[t], out[t]
        for j in range(n_ff):
            g = row[j]
            e = softmax_exp(-abs(g))  # exp(-|g|) <= 1: sigmoid(g) is 1 / (1 + e), or e / (1 + e) below 0
            sigmoid = (_ONE if g >= 0 else e) / (_ONE + e)
            done[j] = g * sigmoid * row[n_ff + j]


@exact_kernel(ieee_division=True)
def _geglu_tanh(out, gate_up):
    n_ff = np.uint64(out.shape[1])
    for t in range(out.shape[0]):
        row, done = gate_up[t], out[t]
        for j in range(n_ff):
            g = row[j]
            y = (g * g * _GELU_COEF + _ONE) * g * _SQRT_2_OVER_PI
            e = softmax_exp(np.float32(-2.0) * abs(y))  # tanh |y| = (1 - e) / (1 + e); only 1 + tanh is used,
            tanh = (_ONE - e) / (_ONE + e)  # so its error near 0 stays a few ulp of 1
            if y < 0:
                tanh = -tanh
            done[j] = (tanh + _ONE) * g * _HALF * row[n_ff + j]


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """x = cap * tanh(x / cap), in place (Gemma 2 style logit soft-capping)."""
    x /= np.float32(cap)
    np.tanh(x, out=x)
    x *= np.float32(cap)
    return x
