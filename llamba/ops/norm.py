"""RMSNorm over the last axis, the residual step that joins a block's output to the stream, and the check
that activations are finite."""

from __future__ import annotations

import numpy as np

from .jit import kernel

NO_WEIGHT = np.zeros(0, np.float32)  # an absent norm (one array type for both cases: one compiled variant)


@kernel(inline=True)
def norm_row(out, x, weight, eps):
    """out = x / sqrt(mean(x^2) + eps) * weight for one row x [d]; out may be x."""
    d = x.shape[0]
    ss = np.float32(0.0)
    for i in range(d):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
    for i in range(d):
        out[i] = x[i] * inv * weight[i]


@kernel
def rmsnorm(out, x, weight, eps):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x [n, d]; out may be x."""
    for t in range(x.shape[0]):
        norm_row(out[t], x[t], weight, eps)


@kernel
def add_block_output(x, block_out, post_weight, next_weight, next_in, eps):
    """The step between two blocks, one call for what took four: block_out is normed by post_weight in place
    (unless it is NO_WEIGHT: Gemma's post-norms), added to the residual stream x, and the next block's input
    next_in = norm(x) * next_weight. Returns whether x is still finite (see all_finite)."""
    total = np.float32(0.0)
    for t in range(x.shape[0]):
        row = x[t]
        if post_weight.size > 0:
            norm_row(block_out[t], block_out[t], post_weight, eps)
        for i in range(row.shape[0]):
            row[i] += block_out[t, i]
            total += row[i] * np.float32(0.0)
        norm_row(next_in[t], row, next_weight, eps)
    return total == 0


@kernel
def all_finite(x):
    """Whether no element of x is NaN or infinite: x * 0 is 0 for every finite x and NaN otherwise, and
    a sum of those vectorizes (a NumPy float64 sum per layer cost 14 us a call in decoding, this about 1)."""
    flat = x.reshape(-1)
    total = np.float32(0.0)
    for i in range(flat.size):
        total += flat[i] * np.float32(0.0)
    return total == 0
