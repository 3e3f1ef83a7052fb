"""A slow, plain NumPy transformer (float64), picoGPT style: the oracle for llamba's kernels and models.

It reads weights with the GGUF reader and `formats.quants.dequantize` (both tested against the `gguf`
package) and shares no code with llamba's ops or models.
"""

from __future__ import annotations

import math

import numpy as np

from llamba.formats.gguf import GGUFFile
from llamba.formats.quants import dequantize


def rmsnorm(x, w, eps):  # [n, d] -> [n, d]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, n_rot, base, neox):  # [n, heads, hd] -> [n, heads, hd]
    inv = base ** (-np.arange(0, n_rot, 2) / n_rot)  # [n_rot/2]
    ang = pos[:, None, None] * inv[None, None, :]  # [n, 1, n_rot/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x = x.copy()
    if neox:
        a, b = x[..., : n_rot // 2].copy(), x[..., n_rot // 2 : n_rot].copy()
        x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return x


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + np.exp(-x))


def int8_inputs(x: np.ndarray, group: int) -> np.ndarray:
    """x [n, d] as the integer weight kernels see it: per token and span of `group` inputs, rounded to the
    nearest multiple of max|x| / 127 (float32 arithmetic, as the kernel's)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, group)
    top = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.divide(np.float32(127), top, out=np.zeros_like(top), where=top > 0)
    return (np.rint(blocks * inverse) * (top / np.float32(127))).reshape(x.shape)


class ReferenceModel:
    """Whole-sequence forward only: logits [n_tokens, n_vocab] for a list of token ids."""

    def __init__(self, g: GGUFFile):
        self.g = g
        a = g.architecture
        self.arch = a
        m = lambda k, d=None: g.get(f"{a}.{k}", d)  # noqa: E731
        self.n_embd = m("embedding_length")
        self.n_layer = m("block_count")
        self.n_head = m("attention.head_count")
        self.n_head_kv = m("attention.head_count_kv", self.n_head)
        self.head_dim = m("attention.key_length", self.n_embd // self.n_head)
        self.n_rot = m("rope.dimension_count", self.head_dim)
        self.base = m("rope.freq_base", 10000.0)
        self.eps = m("attention.layer_norm_rms_epsilon", 1e-5)
        self.window = m("attention.sliding_window", 0) if a == "gemma3" else 0
        self.neox = a in ("qwen2", "qwen3", "gemma3")

    def w(self, name):
        t = self.g.tensors.get(name)
        if t is None:
            return None
        return dequantize(t.data, t.type).astype(np.float64).reshape(t.shape[::-1])

    def linear(self, x, name):
        """x @ W^T, with x rounded to 8 bits per block of the weight's group where W is quantized (the
        integer kernels' arithmetic, and llama.cpp's)."""
        t = self.g.tensors[name]
        if t.type.name not in ("F32", "F16", "BF16"):
            x = int8_inputs(x, 256 if t.type.name.endswith("_K") else 32)  # K-quants: one scale per super-block
        return x @ self.w(name).T

    def forward(self, tokens, kv_type: str = "f32") -> np.ndarray:
        """kv_type "f16": keys and values rounded to float16 as a half-float KV cache stores them."""
        tokens = np.asarray(tokens)
        n, hd, gemma = len(tokens), self.head_dim, self.arch == "gemma3"
        emb = self.w("token_embd.weight")  # [n_vocab, n_embd]
        x = emb[tokens]  # [n, n_embd]
        if gemma:
            x = x * math.sqrt(self.n_embd)
        pos = np.arange(n, dtype=np.float64)
        for i in range(self.n_layer):
            p = f"blk.{i}."
            local = gemma and self.window and i % 6 < 5
            h = rmsnorm(x, self.w(p + "attn_norm.weight"), self.eps)
            q, k, v = (self.linear(h, p + f"attn_{s}.weight") for s in "qkv")  # [n, heads*hd]
            for name, arr in (("q", q), ("k", k), ("v", v)):
                bias = self.w(p + f"attn_{name}.bias")
                if bias is not None:
                    arr += bias
            q, k, v = q.reshape(n, -1, hd), k.reshape(n, -1, hd), v.reshape(n, -1, hd)
            if self.w(p + "attn_q_norm.weight") is not None:
                q = rmsnorm(q, self.w(p + "attn_q_norm.weight"), self.eps)
                k = rmsnorm(k, self.w(p + "attn_k_norm.weight"), self.eps)
            base = 10000.0 if local else self.base
            q, k = rope(q, pos, self.n_rot, base, self.neox), rope(k, pos, self.n_rot, base, self.neox)
            if kv_type == "f16":
                k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
            group = self.n_head // self.n_head_kv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [n, heads, hd]
            scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)  # [heads, n, n]
            qpos, kpos = np.arange(n)[:, None], np.arange(n)[None, :]
            masked = kpos > qpos
            if local:
                masked |= qpos - kpos >= self.window
            scores = np.where(masked[None], -np.inf, scores)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            att = np.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)  # [n, heads*hd]
            out = self.linear(att, p + "attn_output.weight")  # [n, n_embd]
            if gemma:
                out = rmsnorm(out, self.w(p + "post_attention_norm.weight"), self.eps)
            x = x + out
            h = rmsnorm(x, self.w(p + "ffn_norm.weight"), self.eps)
            gate, up = self.linear(h, p + "ffn_gate.weight"), self.linear(h, p + "ffn_up.weight")  # [n, n_ff]
            out = self.linear((gelu_tanh(gate) if gemma else silu(gate)) * up, p + "ffn_down.weight")
            if gemma:
                out = rmsnorm(out, self.w(p + "post_ffw_norm.weight"), self.eps)
            x = x + out
        x = rmsnorm(x, self.w("output_norm.weight"), self.eps)
        out_name = "output.weight" if "output.weight" in self.g.tensors else "token_embd.weight"
        return self.linear(x, out_name)  # [n, n_vocab]
