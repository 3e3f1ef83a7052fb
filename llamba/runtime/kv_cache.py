"""The KV cache: preallocated keys and values per layer, rolled back with `trim`."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values [n_layer][n_head_kv, n_ctx, head_dim] float32, filled up to `n_past`.

    np.zeros maps untouched pages lazily, so a long context costs memory only as it fills.
    """

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, n_ctx: int):
        self.n_ctx = n_ctx
        self.n_past = 0
        self.k = [np.zeros((n_head_kv, n_ctx, head_dim), np.float32) for _ in range(n_layer)]
        self.v = [np.zeros((n_head_kv, n_ctx, head_dim), np.float32) for _ in range(n_layer)]

    @classmethod
    def for_model(cls, hp, n_ctx: int | None = None) -> "KVCache":
        return cls(hp.n_layer, hp.n_head_kv, hp.head_dim, n_ctx or hp.n_ctx_train)

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v [n_tokens, n_head_kv, head_dim] at positions start.."""
        n = k.shape[0]
        self.k[layer][:, start : start + n] = k.transpose(1, 0, 2)
        self.v[layer][:, start : start + n] = v.transpose(1, 0, 2)

    def trim(self, n: int) -> None:
        """Forget everything from position n on (speculative tokens rejected, a chat turn regenerated)."""
        self.n_past = max(0, min(n, self.n_past))

    @property
    def nbytes_used(self) -> int:
        per_pos = sum(a.shape[0] * a.shape[2] * a.itemsize for a in self.k + self.v)
        return per_pos * self.n_past
