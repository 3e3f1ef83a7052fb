"""RMSNorm over the last axis."""

from __future__ import annotations

import numpy as np

from .jit import kernel


@kernel
def rmsnorm(out, x, weight, eps):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for x [n, d]; out may be x."""
    n, d = x.shape
    for t in range(n):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * inv * weight[i]
