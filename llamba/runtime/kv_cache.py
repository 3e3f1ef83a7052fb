"""The KV cache: preallocated keys and values per layer, rolled back with `trim`."""

from __future__ import annotations

import numpy as np


from ..errors import LlambaError

KV_TYPES = ("f32", "f16")


class KVCache:
    """Keys and values [n_layer][n_head_kv, n_ctx, head_dim], filled up to `n_past`.

    kv_type "f32" stores float32; "f16" stores float16 bits as uint16 (half the memory; Numba has no float16
    type, and the attention kernels decode the bits exactly). np.zeros maps untouched pages lazily, so a long
    context costs memory only as it fills.
    """

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, n_ctx: int, kv_type: str = "f32"):
        if kv_type not in KV_TYPES:
            raise LlambaError(f"KV cache type must be one of {', '.join(KV_TYPES)} (got {kv_type!r})")
        self.n_ctx = n_ctx
        self.n_past = 0
        self.kv_type = kv_type
        dtype = np.float32 if kv_type == "f32" else np.uint16
        self.k = [np.zeros((n_head_kv, n_ctx, head_dim), dtype) for _ in range(n_layer)]
        self.v = [np.zeros((n_head_kv, n_ctx, head_dim), dtype) for _ in range(n_layer)]

    @classmethod
    def for_model(cls, hp, n_ctx: int | None = None, kv_type: str = "f32") -> "KVCache":
        return cls(hp.n_layer, hp.n_head_kv, hp.head_dim, n_ctx or hp.n_ctx_train, kv_type)

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v [n_tokens, n_head_kv, head_dim] float32 at positions start.."""
        n = k.shape[0]
        self.k[layer][:, start : start + n] = self._stored(k.transpose(1, 0, 2))
        self.v[layer][:, start : start + n] = self._stored(v.transpose(1, 0, 2))

    def _stored(self, x: np.ndarray) -> np.ndarray:
        return x if self.kv_type == "f32" else x.astype(np.float16).view(np.uint16)

    def trim(self, n: int) -> None:
        """Forget everything from position n on (speculative tokens rejected, a chat turn regenerated)."""
        self.n_past = max(0, min(n, self.n_past))

    @property
    def nbytes(self) -> int:
        """The whole cache, every position of the context (pages of unused positions are never touched)."""
        return sum(a.nbytes for a in self.k + self.v)

    @property
    def nbytes_used(self) -> int:
        per_pos = sum(a.shape[0] * a.shape[2] * a.itemsize for a in self.k + self.v)
        return per_pos * self.n_past
