"""Multi-head latent attention (DeepSeek-V2's MLA) with the weights absorbed, as llama.cpp runs it.

Each token's keys and values are one compressed latent c = norm(h @ Wkv_a) [kv_lora_rank] plus one rotary key
k_pe [n_rot] shared by all heads; only these kv_lora_rank + n_rot values per token are cached. The per-head
decompression of c into keys (k_b) and values (v_b) is folded into the query and output sides:

    q_nope . k_nope = q_nope . (k_b^T c)  = (k_b q_nope) . c        (q absorbed: [kv_lora_rank] per head)
    out_h = sum_i p_i (v_b c_i) = v_b (sum_i p_i c_i)                (v_b after attention)

so attention is one key head of [k_pe | c] for all query heads [q_pe | k_b q_nope] (multi-query attention),
its values the same vectors, of which the latent part is kept. Scores are scaled by 1/sqrt(nope + n_rot),
as the uncompressed heads are. Q comes from the input directly (V2-Lite) or through its own low-rank
projection with a norm between (q_lora_rank). RoPE rotates the first n_rot dimensions of a head, so the
rotary parts go first; the order of a dot product's terms is all that changes.

The cache is the shared one (memory/), one key head wide kv_lora_rank + n_rot, whose values are its keys:
it holds each token's vector once (576 values a token and layer for V2-Lite, against 2 x 16 x 192 for its
uncompressed heads), quantized caches too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.heads import rope_heads
from ..ops.matmul import matmul
from ..ops.norm import rmsnorm
from ..ops.repack import LaneMatrix, stack_lanes


@dataclass
class LatentDims:
    q_lora_rank: int  # 0: Q projected straight from the input
    kv_lora_rank: int
    nope: int  # each head's dimensions without position (qk_nope_head_dim)
    n_rot: int  # its rotary dimensions, the one k_pe shared by the heads (qk_rope_head_dim)
    v_head: int  # each head's value dimensions after decompression

    @property
    def cached(self) -> int:
        """Values cached per token (and the attention's head size): the rotary key and the latent."""
        return self.n_rot + self.kv_lora_rank


class LatentAttention:
    """One layer's latent attention: `__call__(h, kv, cells, cos, sin, attend)` -> [n_tokens, n_embd]."""

    def __init__(self, dims: LatentDims, n_head: int, eps: float, q: list[LaneMatrix], q_a_norm: np.ndarray,
                 kv_a: LaneMatrix, kv_a_norm: np.ndarray, k_b: list[LaneMatrix], v_b: list[LaneMatrix], wo: LaneMatrix):
        self.dims, self.n_head, self.eps = dims, n_head, eps
        self.q = q  # [n_head * (nope + n_rot), n_embd], or with a q_lora_rank: wq_a [q_lora, n_embd], wq_b [.., q_lora]
        self.q_a_norm = q_a_norm  # [q_lora_rank] (empty without one)
        self.kv_a = kv_a  # [kv_lora_rank + n_rot, n_embd]: the latent, then the rotary key
        self.kv_a_norm = kv_a_norm  # [kv_lora_rank]
        self.k_b = k_b  # per head [kv_lora_rank, nope]: absorbs q_nope into the latent's space
        self.v_b = v_b  # per head [v_head, kv_lora_rank]: the latent attended to, decompressed
        self.wo = wo  # [n_embd, n_head * v_head]

    @property
    def matrices(self) -> list[LaneMatrix]:
        return [*self.q, self.kv_a, *self.k_b, *self.v_b, self.wo]

    def __call__(self, h: np.ndarray, kv, cells, cos, sin, attend) -> np.ndarray:
        d, n, n_head = self.dims, h.shape[0], self.n_head
        q = self._queries(h).reshape(n, n_head, d.nope + d.n_rot)
        kv_a = matmul(h, self.kv_a)  # [n, kv_lora_rank + n_rot]
        queries = np.empty((n, n_head, d.cached), np.float32)  # [q_pe | k_b q_nope] per head
        keys = np.empty((n, 1, d.cached), np.float32)  # [k_pe | c]: the cached values too
        queries[:, :, : d.n_rot] = q[:, :, d.nope :]
        keys[:, 0, : d.n_rot] = kv_a[:, d.kv_lora_rank :]
        rope_heads(queries, cos, sin, False)
        rope_heads(keys, cos, sin, False)
        latent = np.empty((n, d.kv_lora_rank), np.float32)
        rmsnorm(latent, np.ascontiguousarray(kv_a[:, : d.kv_lora_rank]), self.kv_a_norm, self.eps)
        keys[:, 0, d.n_rot :] = latent
        for head in range(n_head):
            queries[:, head, d.n_rot :] = matmul(np.ascontiguousarray(q[:, head, : d.nope]), self.k_b[head])
        kv.write(cells, keys, keys)
        att = np.empty_like(queries)
        attend(att, queries, kv, 0)
        out = np.empty((n, n_head, d.v_head), np.float32)
        for head in range(n_head):
            out[:, head] = matmul(np.ascontiguousarray(att[:, head, d.n_rot :]), self.v_b[head])
        return matmul(out.reshape(n, n_head * d.v_head), self.wo)

    def _queries(self, h: np.ndarray) -> np.ndarray:
        if len(self.q) == 1:
            return matmul(h, self.q[0])
        q_a = matmul(h, self.q[0])
        rmsnorm(q_a, q_a, self.q_a_norm, self.eps)
        return matmul(q_a, self.q[1])


def load_latent(model, p: str, dims: LatentDims, n_head: int, n_embd: int, eps: float) -> LatentAttention:
    """Layer `p`'s latent attention from attn_q (or attn_q_a, attn_q_a_norm, attn_q_b), attn_kv_a_mqa,
    attn_kv_a_norm, attn_k_b [n_head, kv_lora, nope], attn_v_b [n_head, v_head, kv_lora] and attn_output;
    `model` is the loading Transformer (its shape checks, its arena)."""
    q_width = n_head * (dims.nope + dims.n_rot)
    if dims.q_lora_rank:
        q = [model.matrix(p + "attn_q_a.weight", n_embd, dims.q_lora_rank),
             model.matrix(p + "attn_q_b.weight", dims.q_lora_rank, q_width)]
        q_a_norm = model.vector(p + "attn_q_a_norm.weight", dims.q_lora_rank)
    else:
        q, q_a_norm = [model.matrix(p + "attn_q.weight", n_embd, q_width)], np.zeros(0, np.float32)
    return LatentAttention(
        dims, n_head, eps, q, q_a_norm,
        kv_a=model.matrix(p + "attn_kv_a_mqa.weight", n_embd, dims.cached),
        kv_a_norm=model.vector(p + "attn_kv_a_norm.weight", dims.kv_lora_rank),
        k_b=_per_head(model, p + "attn_k_b.weight", (dims.nope, dims.kv_lora_rank, n_head)),
        v_b=_per_head(model, p + "attn_v_b.weight", (dims.kv_lora_rank, dims.v_head, n_head)),
        wo=model.matrix(p + "attn_output.weight", n_head * dims.v_head, n_embd),
    )


def _per_head(model, name: str, shape: tuple[int, int, int]) -> list[LaneMatrix]:
    """A [n_head, rows, cols] tensor as one lanes matrix per head."""
    t = model.tensor(name, shape)
    heads = [stack_lanes([(t.data[i], t.type)], shape[0], model.allocate) for i in range(shape[2])]
    model.gguf.release_pages(t)
    return heads
