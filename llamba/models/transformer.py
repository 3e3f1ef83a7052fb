"""The decoder-only transformer every supported family shares, built from ops.

An architecture module reads its hyperparameters from GGUF metadata into `HParams` (which features it uses:
QKV bias, QK-norm, post-norms, GELU, sliding windows, scaled embeddings) and `Transformer` runs the layer recipe:

    x = embed(tokens) * embed_scale                                        # [n_tokens, n_embd]
    per layer:  h = norm(x);  q, k, v = split(h @ Wqkv + b);  [q, k = norm per head];  rope(q, k)
                x += [post_norm](attention(q, cache(k, v)) @ Wo)
                h = norm(x);  x += [post_norm](act(h @ Wgate) * (h @ Wup) @ Wdown)
    logits = norm(x) @ Wout                                                # [n_tokens, n_vocab]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import LlambaError, UnsupportedError
from ..formats.gguf import GGUFFile
from ..formats.quants import dequantize
from ..ops.activations import geglu_tanh, softcap, swiglu
from ..ops.attention import attention_chain, attention_listed
from ..ops.matmul import SMALL_BATCH, gather_rows, matmul
from ..ops.norm import rmsnorm
from ..ops.repack import LaneMatrix, concat_rows, to_lanes
from ..ops.rope import RopeConfig, rope_inplace, rope_tables
from ..runtime.batch import Batch


@dataclass
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope: RopeConfig
    rope_local: RopeConfig | None = None  # sliding-window layers' own RoPE (Gemma 3)
    sliding_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)  # True where a layer uses the sliding window
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    embed_scale: float = 1.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    activation: str = "silu"  # silu | gelu
    qk_norm: bool = False
    post_norms: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass
class Layer:
    attn_norm: np.ndarray
    wqkv: list[LaneMatrix]  # one fused matrix, or q, k, v when their layouts differ
    bqkv: np.ndarray | None
    wo: LaneMatrix
    ffn_norm: np.ndarray
    w_gate_up: list[LaneMatrix]  # one fused matrix, or gate, up
    w_down: LaneMatrix
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None


class Transformer:
    """A loaded model: `forward(batch, cache)` returns logits for the batch rows that want them."""

    def __init__(self, g: GGUFFile, hp: HParams):
        self.gguf = g
        self.hp = hp
        self.tok_embd = self._matrix("token_embd.weight", hp.n_embd)
        self.output_norm = self._vector("output_norm.weight")
        self.output = self._matrix("output.weight", hp.n_embd) if "output.weight" in g.tensors else self.tok_embd
        self.layers = [self._layer(i) for i in range(hp.n_layer)]
        g.release_pages()  # everything lives in the repacked arrays now; keep the file's pages out of RSS
        _return_freed_memory()

    # ------------------------------------------------------------------------------------------ loading

    def _tensor(self, name: str):
        try:
            return self.gguf.tensors[name]
        except KeyError:
            raise LlambaError(f"{self.gguf.path}: tensor {name} is missing (is this really a {self.hp.arch} model?)") from None

    def _vector(self, name: str) -> np.ndarray:
        t = self._tensor(name)
        if t.type.name != "F32":
            return dequantize(t.data, t.type).reshape(-1)
        # a copy, not a view: the file's pages are released after loading and a view would fault them back
        return np.array(t.data, dtype=np.float32).reshape(-1)

    def _optional_vector(self, name: str) -> np.ndarray | None:
        return self._vector(name) if name in self.gguf.tensors else None

    def _matrix(self, name: str, n_cols: int) -> LaneMatrix:
        t = self._tensor(name)
        if len(t.shape) != 2 or t.shape[0] != n_cols:
            raise LlambaError(f"{self.gguf.path}: tensor {name} has shape {t.shape}, expected ({n_cols}, rows)")
        return to_lanes(t.data, t.type, n_cols)

    def _fused(self, names: list[str], n_cols: int) -> list[LaneMatrix]:
        parts = [self._matrix(n, n_cols) for n in names]
        fused = concat_rows(parts)
        return [fused] if fused is not None else parts

    def _layer(self, i: int) -> Layer:
        hp, p = self.hp, f"blk.{i}."
        biases = [self._optional_vector(p + f"attn_{x}.bias") for x in "qkv"]
        return Layer(
            attn_norm=self._vector(p + "attn_norm.weight"),
            wqkv=self._fused([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], hp.n_embd),
            bqkv=np.concatenate(biases) if all(b is not None for b in biases) else None,
            wo=self._matrix(p + "attn_output.weight", hp.q_dim),
            ffn_norm=self._vector(p + "ffn_norm.weight"),
            w_gate_up=self._fused([p + "ffn_gate.weight", p + "ffn_up.weight"], hp.n_embd),
            w_down=self._matrix(p + "ffn_down.weight", hp.n_ff),
            q_norm=self._optional_vector(p + "attn_q_norm.weight") if hp.qk_norm else None,
            k_norm=self._optional_vector(p + "attn_k_norm.weight") if hp.qk_norm else None,
            attn_post_norm=self._optional_vector(p + "post_attention_norm.weight") if hp.post_norms else None,
            ffn_post_norm=self._optional_vector(p + "post_ffw_norm.weight") if hp.post_norms else None,
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: Batch, cache, exact: bool = False) -> np.ndarray:
        """Run a batch through the model, its K/V joining the cache; returns float32 logits [n_rows, n_vocab]
        for the rows with want_logits, in batch order.

        The one path for prompts, guesses and several sequences. The matrix kernels are batch invariant;
        attention is too (each token walks its own visibility list), except that a single chain of more than
        SMALL_BATCH tokens (a long prompt) takes BLAS in blocks, about 20% faster at 512 tokens, whose bits
        depend on where the prompt was split. exact: never that path, so every token's logits are
        bit-identical however the batches were cut (what the server promises).
        """
        hp = self.hp
        batch.validate(hp.n_vocab)
        placement = cache.place(batch)
        try:
            x = self._layers(batch, placement, cache, exact)
        except BaseException:
            cache.remove_cells(placement.cells)  # a failed pass leaves nothing behind
            raise
        x = x[batch.want_logits]
        h = np.empty_like(x)
        rmsnorm(h, x, self.output_norm, hp.norm_eps)
        logits = matmul(h, self.output)
        if hp.final_softcap:
            softcap(logits, hp.final_softcap)
        return logits

    def forward_tokens(self, tokens, start_pos: int, cache, all_logits: bool = False, logits_from: int = 0) -> np.ndarray:
        """One sequence (0): tokens at positions start_pos.., replacing whatever the cache held from there.

        Returns logits [n_tokens - logits_from, n_vocab] if all_logits (the output projection is the costliest
        matmul of a long prefill, so only the rows asked for are computed), else [n_vocab] for the last token.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise LlambaError("forward needs at least one token")
        if start_pos + len(tokens) > cache.n_ctx:
            raise LlambaError(f"context is full: {start_pos} + {len(tokens)} tokens exceed the context of {cache.n_ctx}")
        cache.remove(0, start_pos)
        batch = Batch.chain(tokens, start_pos, logits="all" if all_logits else "last")
        batch.want_logits[:logits_from] = False
        logits = self.forward(batch, cache)
        return logits if all_logits else logits[0]

    def _layers(self, batch: Batch, placement, cache, exact: bool) -> np.ndarray:
        hp = self.hp
        x = gather_rows(self.tok_embd, batch.tokens)
        if hp.embed_scale != 1.0:
            x *= np.float32(hp.embed_scale)
        tables = {False: rope_tables(batch.positions, hp.rope)}
        if hp.rope_local is not None:
            tables[True] = rope_tables(batch.positions, hp.rope_local)
        attend = self._attention_over(batch, placement, cache, exact)
        for i, layer in enumerate(self.layers):
            local = bool(hp.swa_layers and hp.swa_layers[i])
            cos, sin = tables[local and hp.rope_local is not None]
            self._attention_block(x, layer, i, placement.cells, cache, cos, sin, attend, local)
            self._ffn_block(x, layer)
        return x

    def _attention_over(self, batch: Batch, placement, cache, exact: bool):
        """attend(out, q, layer, window): the attention kernel this batch takes, its visibility worked out once
        for all layers. Long prompts go through BLAS in blocks; everything else through the listed kernel."""
        hp = self.hp
        scale = np.float32(hp.attn_scale or 1.0 / math.sqrt(hp.head_dim))
        capped = np.float32(hp.attn_softcap)
        if len(batch) > SMALL_BATCH and placement.is_chain and not exact:
            keys = placement.chain_keys()
            key_pos = cache.cell_pos[keys]

            def attend(out, q, i, window):
                attention_chain(out, q, cache.k[i], cache.v[i], keys, key_pos, batch.positions, scale, window, capped)
        else:
            visible, counts = placement.visible_lists()

            def attend(out, q, i, window):
                attention_listed(out, q, cache.k[i], cache.v[i], visible, counts, cache.cell_pos, batch.positions,
                                 scale, window, capped)
        return attend

    def _project(self, h: np.ndarray, weights: list[LaneMatrix], width: int) -> np.ndarray:
        out = np.empty((h.shape[0], width), np.float32)
        at = 0
        for w in weights:
            matmul(h, w, out=out[:, at : at + w.n_rows])
            at += w.n_rows
        return out

    def _attention_block(self, x, layer: Layer, i: int, cells, cache, cos, sin, attend, local: bool) -> None:
        hp = self.hp
        n = x.shape[0]
        h = np.empty_like(x)
        rmsnorm(h, x, layer.attn_norm, hp.norm_eps)
        qkv = self._project(h, layer.wqkv, hp.q_dim + 2 * hp.kv_dim)
        if layer.bqkv is not None:
            qkv += layer.bqkv
        q = np.ascontiguousarray(qkv[:, : hp.q_dim]).reshape(n, hp.n_head, hp.head_dim)
        k = np.ascontiguousarray(qkv[:, hp.q_dim : hp.q_dim + hp.kv_dim]).reshape(n, hp.n_head_kv, hp.head_dim)
        v = qkv[:, hp.q_dim + hp.kv_dim :].reshape(n, hp.n_head_kv, hp.head_dim)
        if layer.q_norm is not None:
            rmsnorm(q.reshape(-1, hp.head_dim), q.reshape(-1, hp.head_dim), layer.q_norm, hp.norm_eps)
            rmsnorm(k.reshape(-1, hp.head_dim), k.reshape(-1, hp.head_dim), layer.k_norm, hp.norm_eps)
        neox = hp.rope.neox
        rope_inplace(q, cos, sin, neox)
        rope_inplace(k, cos, sin, neox)
        cache.store(i, cells, k, v)
        att = np.empty((n, hp.n_head, hp.head_dim), np.float32)
        attend(att, q, i, hp.sliding_window if local else 0)
        out = matmul(att.reshape(n, hp.q_dim), layer.wo)
        if layer.attn_post_norm is not None:
            rmsnorm(out, out, layer.attn_post_norm, hp.norm_eps)
        x += out

    def _ffn_block(self, x, layer: Layer) -> None:
        hp = self.hp
        h = np.empty_like(x)
        rmsnorm(h, x, layer.ffn_norm, hp.norm_eps)
        gate_up = self._project(h, layer.w_gate_up, 2 * hp.n_ff)
        act = np.empty((x.shape[0], hp.n_ff), np.float32)
        (geglu_tanh if hp.activation == "gelu" else swiglu)(act, gate_up[:, : hp.n_ff], gate_up[:, hp.n_ff :])
        out = matmul(act, layer.w_down)
        if layer.ffn_post_norm is not None:
            rmsnorm(out, out, layer.ffn_post_norm, hp.norm_eps)
        x += out


def _return_freed_memory() -> None:
    """Hand the repacking's freed temporaries back to the OS (glibc keeps them in its heap otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def read_common(g: GGUFFile, neox: bool) -> HParams:
    """The hyperparameters every family stores under `{arch}.*`, with llama.cpp's defaults."""
    arch = g.architecture

    def need(key: str):
        value = g.arch_value(key)
        if value is None:
            raise LlambaError(f"{g.path}: metadata key {arch}.{key} is missing")
        return value

    n_embd = int(need("embedding_length"))
    n_head = _scalar(need("attention.head_count"), "attention.head_count", g)
    n_head_kv = _scalar(g.arch_value("attention.head_count_kv", n_head), "attention.head_count_kv", g)
    head_dim = int(g.arch_value("attention.key_length", n_embd // n_head))
    tokens = g.get("tokenizer.ggml.tokens")
    n_vocab = int(g.arch_value("vocab_size", len(tokens) if tokens is not None else 0))
    if n_vocab == 0:
        n_vocab = g.tensors["token_embd.weight"].shape[1]
    n_ctx_train = int(g.arch_value("context_length", 2048))
    return HParams(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=int(need("block_count")), n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, n_ff=_scalar(need("feed_forward_length"), "feed_forward_length", g),
        n_ctx_train=n_ctx_train, norm_eps=float(g.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=read_rope(g, head_dim, neox, n_ctx_train),
    )


def read_rope(g: GGUFFile, head_dim: int, neox: bool, n_ctx_train: int) -> RopeConfig:
    scaling = g.arch_value("rope.scaling.type", "none")
    factor = float(g.arch_value("rope.scaling.factor", 1.0) or 1.0)
    if g.arch_value("rope.freq_scale") is not None:  # older files store 1/factor
        factor = 1.0 / float(g.arch_value("rope.freq_scale"))
        scaling = "linear" if scaling == "none" else scaling
    if scaling not in ("none", "linear", "yarn", "llama3"):
        raise UnsupportedError(f"{g.path}: RoPE scaling {scaling!r} is not supported")
    freq_factors = None
    if "rope_freqs.weight" in g.tensors:  # llama 3.1+ ships its long-context frequency divisors
        freq_factors = tuple(float(f) for f in np.asarray(g.tensors["rope_freqs.weight"].data).reshape(-1))
        scaling = "none" if scaling == "llama3" else scaling
    return RopeConfig(
        n_rot=int(g.arch_value("rope.dimension_count", head_dim)),
        base=float(g.arch_value("rope.freq_base", 10000.0)),
        neox=neox,
        scaling=scaling,
        factor=factor,
        n_ctx_orig=int(g.arch_value("rope.scaling.original_context_length", n_ctx_train)),
        yarn_attn_factor=float(g.arch_value("rope.scaling.attn_factor", 1.0)),
        freq_factors=freq_factors,
    )


def _scalar(value, key: str, g: GGUFFile) -> int:
    """Some files store per-layer counts as arrays; we support only uniform ones."""
    if isinstance(value, np.ndarray):
        if value.size == 0 or (value != value[0]).any():
            raise UnsupportedError(f"{g.path}: per-layer {key} values differ; not supported")
        value = value[0]
    return int(value)
