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
from dataclasses import dataclass

import numpy as np

from ..errors import ContextOverflowError, GGUFError, LlambaError, NumericalError
from ..formats.gguf import GGUFFile
from ..formats.quants import dequantize
from ..memory.batch import Batch
from ..memory.kv_cache import KeyStatistics, KVCache
from ..ops.activations import geglu_tanh, softcap, swiglu
from ..ops.matmul import SMALL_BATCH, gather_rows, matmul
from ..ops.heads import split_heads
from ..ops.norm import NO_WEIGHT, add_block_output, all_finite, rmsnorm
from ..ops.repack import LaneMatrix, WeightArena, lanes_nbytes, stack_lanes, stack_runs
from ..ops.rope import rope_tables
from ..ops.threads import ThreadGovernor
from .metadata import HParams


class FileRows:
    """An embedding table left in the file, its rows dequantized as tokens need them. A model with its own
    output matrix only ever gathers a few rows of it: repacking it would cost memory (131 MB for
    Qwen2.5-Coder-1.5B) and load time for nothing; the rows read stay in the page cache."""

    def __init__(self, t):
        self.data, self.type = t.data, t.type

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return dequantize(self.data[rows], self.type).reshape(len(rows), -1)


class LaneRows:
    """An embedding table that is also the output matrix (tied): its rows come from the repacked weights."""

    def __init__(self, w: LaneMatrix):
        self.matrix = w

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return gather_rows(self.matrix, rows)


@dataclass
class Layer:
    """One layer's weights; a bias or norm the model does not have is NO_WEIGHT (empty)."""

    attn_norm: np.ndarray
    wqkv: list[LaneMatrix]  # one fused matrix, or q, k, v when their layouts differ
    bqkv: np.ndarray
    wo: LaneMatrix
    ffn_norm: np.ndarray
    w_gate_up: list[LaneMatrix]  # one fused matrix, or gate, up
    w_down: LaneMatrix
    q_norm: np.ndarray
    k_norm: np.ndarray
    attn_post_norm: np.ndarray
    ffn_post_norm: np.ndarray

    @property
    def matrices(self) -> list[LaneMatrix]:
        return [*self.wqkv, self.wo, *self.w_gate_up, self.w_down]


class Transformer:
    """A loaded model: `forward(batch, cache)` returns logits for the batch rows that want them."""

    def __init__(self, g: GGUFFile, hp: HParams):
        self.gguf = g
        self.hp = hp
        tied = "output.weight" not in g.tensors
        repacked = [t for name, t in g.tensors.items() if len(t.shape) == 2 and (tied or name != "token_embd.weight")]
        self._arena = WeightArena(sum(lanes_nbytes(t.type, t.n_rows, t.shape[0]) for t in repacked))
        self.output_norm = self._vector("output_norm.weight", hp.n_embd)
        if tied:
            self.output = self._matrix("token_embd.weight", hp.n_embd, hp.n_vocab)
            self.tok_embd = LaneRows(self.output)
        else:
            self.tok_embd = FileRows(self._tensor("token_embd.weight", (hp.n_embd, hp.n_vocab)))
            self.output = self._matrix("output.weight", hp.n_embd, hp.n_vocab)
        self.layers = [self._layer(i) for i in range(hp.n_layer)]
        del self._arena  # its mapping lives on in the weights' arrays
        self.threads = ThreadGovernor()  # how many threads each forward uses, by measurement
        self.key_stats: KeyStatistics | None = None  # set by calibrate_keys, for quantized caches
        self.calibration_tokens: list[int] = []
        g.release_pages()  # everything lives in the repacked arrays now; keep the file's pages out of RSS
        _return_freed_memory()

    def calibrate_keys(self, tokens: list[int]) -> KeyStatistics:
        """Measure the centre and spread of this model's keys over a fixed text's tokens, once: every quantized
        cache the model makes afterwards takes them out of its keys (see memory.kv_cache.BlockLayerKV). Fixed
        per model, so a token's quantized key never depends on what else the cache holds."""
        if self.key_stats is None or tokens != self.calibration_tokens:
            cache = KVCache.for_model(self.hp, len(tokens), "f32")
            self.forward_tokens(tokens, 0, cache)
            cells = cache.seq_cells(0)[1:]  # the first token is an attention sink, its key unlike the others
            self.key_stats = KeyStatistics.of_keys([k[:, cells] for k in cache.k], self.hp.rope.neox)
            self.calibration_tokens = list(tokens)
        return self.key_stats

    def new_cache(self, n_ctx: int | None = None, kv_type: str = "f32", n_cells: int | None = None) -> KVCache:
        """A KV cache for this model (a quantized one with the keys' calibration, when it was measured)."""
        return KVCache.for_model(self.hp, n_ctx, kv_type, n_cells, self.key_stats)

    # ------------------------------------------------------------------------------------------ loading
    # Every tensor's whole shape is checked against the hyperparameters: the kernels trust them. Each
    # tensor's file pages are released as soon as it is repacked, so loading never holds the file and the
    # repacked weights at once: peak memory is the weights plus one tensor.

    def _tensor(self, name: str, shape: tuple[int, ...]):
        t = self.gguf.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.gguf.path}: tensor {name} is missing (is this really a {self.hp.arch} model?)")
        if tuple(t.shape) != shape:
            raise GGUFError(f"{self.gguf.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape} "
                            "from the metadata")
        return t

    def _vector(self, name: str, n: int) -> np.ndarray:
        t = self._tensor(name, (n,))
        if t.type.name != "F32":
            return dequantize(t.data, t.type).reshape(-1)
        # a copy, not a view: the file's pages are released after loading and a view would fault them back
        return np.array(t.data, dtype=np.float32).reshape(-1)

    def _optional_vector(self, name: str, n: int) -> np.ndarray:
        return self._vector(name, n) if name in self.gguf.tensors else NO_WEIGHT

    def _matrix(self, name: str, n_cols: int, n_rows: int) -> LaneMatrix:
        return self._fused([(name, n_rows)], n_cols)[0]

    def _fused(self, shapes: list[tuple[str, int]], n_cols: int) -> list[LaneMatrix]:
        """The matrices as few as possible: each run of neighbours that share a layout stacked into one."""
        tensors = [self._tensor(name, (n_cols, n_rows)) for name, n_rows in shapes]
        runs = stack_runs([(t.data, t.type) for t in tensors])
        matrices = [stack_lanes(run, n_cols, self._arena.zeros) for run in runs]
        for t in tensors:
            self.gguf.release_pages(t)
        return matrices

    def _layer(self, i: int) -> Layer:
        hp, p = self.hp, f"blk.{i}."
        q, kv, d = hp.q_dim, hp.kv_dim, hp.head_dim
        biases = [self._optional_vector(p + f"attn_{x}.bias", n) for x, n in (("q", q), ("k", kv), ("v", kv))]
        return Layer(
            attn_norm=self._vector(p + "attn_norm.weight", hp.n_embd),
            wqkv=self._fused([(p + "attn_q.weight", q), (p + "attn_k.weight", kv), (p + "attn_v.weight", kv)], hp.n_embd),
            bqkv=np.concatenate(biases) if all(b.size for b in biases) else NO_WEIGHT,
            wo=self._matrix(p + "attn_output.weight", q, hp.n_embd),
            ffn_norm=self._vector(p + "ffn_norm.weight", hp.n_embd),
            w_gate_up=self._fused([(p + "ffn_gate.weight", hp.n_ff), (p + "ffn_up.weight", hp.n_ff)], hp.n_embd),
            w_down=self._matrix(p + "ffn_down.weight", hp.n_ff, hp.n_embd),
            q_norm=self._vector(p + "attn_q_norm.weight", d) if hp.qk_norm else NO_WEIGHT,
            k_norm=self._vector(p + "attn_k_norm.weight", d) if hp.qk_norm else NO_WEIGHT,
            attn_post_norm=self._optional_vector(p + "post_attention_norm.weight", hp.n_embd) if hp.post_norms else NO_WEIGHT,
            ffn_post_norm=self._optional_vector(p + "post_ffw_norm.weight", hp.n_embd) if hp.post_norms else NO_WEIGHT,
        )

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: Batch, cache, exact: bool = False, skip: frozenset[int] = frozenset()) -> np.ndarray:
        """Run a batch through the model, its K/V joining the cache; returns float32 logits [n_rows, n_vocab]
        for the rows with want_logits, in batch order.

        The one path for prompts, guesses and several sequences. The matrix kernels are batch invariant;
        attention is too (each token walks its own visibility list), except that a single chain of more than
        SMALL_BATCH tokens (a long prompt) takes blocks of register-blocked products, 15-20% faster at 512
        tokens, whose bits depend on where the prompt was split. exact: never that path, so every token's
        logits are bit-identical however the batches were cut (what the server promises). skip: layers left
        out (the model as its own cheaper draft; those layers' cache cells are left unwritten).
        """
        batch.validate(self.hp.n_vocab)
        with self.threads.run(len(batch), variant=len(skip)):
            return self._forward(batch, cache, exact, skip)

    def _forward(self, batch: Batch, cache, exact: bool, skip: frozenset[int]) -> np.ndarray:
        hp = self.hp
        placement = cache.place(batch)
        try:
            h = self._layers(batch, placement, cache, exact, skip)
        except BaseException:
            cache.remove_cells(placement.cells)  # a failed pass leaves nothing behind
            raise
        logits = matmul(h[batch.want_logits], self.output)
        if hp.final_softcap:
            softcap(logits, hp.final_softcap)
        self._check_finite(all_finite(logits), "the output projection")
        return logits

    def forward_tokens(self, tokens, start_pos: int, cache, all_logits: bool = False, logits_from: int = 0,
                       skip: frozenset[int] = frozenset()) -> np.ndarray:
        """One sequence (0): tokens at positions start_pos.., replacing whatever the cache held from there.

        Returns logits [n_tokens - logits_from, n_vocab] if all_logits (the output projection is the costliest
        matmul of a long prefill, so only the rows asked for are computed), else [n_vocab] for the last token.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) == 0:
            raise LlambaError("forward needs at least one token")
        if start_pos + len(tokens) > cache.n_ctx:
            raise ContextOverflowError(f"context is full: {start_pos} + {len(tokens)} tokens exceed the context of {cache.n_ctx}")
        cache.remove(0, start_pos)
        batch = Batch.chain(tokens, start_pos, logits="all" if all_logits else "last")
        batch.want_logits[:logits_from] = False
        logits = self.forward(batch, cache, skip=skip)
        return logits if all_logits else logits[0]

    def _layers(self, batch: Batch, placement, cache, exact: bool, skip: frozenset[int]) -> np.ndarray:
        """The residual stream through every layer not skipped; returns it normed by the output norm.

        Each block starts from h, its input already normed, and ends by adding its output to the stream x
        and norming x for the next block (the next layer's attention, or the output projection)."""
        hp = self.hp
        x = self.tok_embd.gather(batch.tokens)
        if hp.embed_scale != 1.0:
            x *= np.float32(hp.embed_scale)
        self._check_finite(all_finite(x), "the token embeddings")
        tables = {False: rope_tables(batch.positions, hp.rope)}
        if hp.rope_local is not None:
            tables[True] = rope_tables(batch.positions, hp.rope_local)
        attend = self._attention_over(batch, placement, cache, exact)
        layers = [(i, layer) for i, layer in enumerate(self.layers) if i not in skip]
        next_norms = [layer.attn_norm for _, layer in layers[1:]] + [self.output_norm]
        h = np.empty_like(x)
        rmsnorm(h, x, layers[0][1].attn_norm if layers else self.output_norm, hp.norm_eps)
        for (i, layer), next_norm in zip(layers, next_norms):
            local = bool(hp.swa_layers and hp.swa_layers[i])
            cos, sin = tables[local and hp.rope_local is not None]
            self._attention_block(x, h, layer, i, placement.cells, cache, cos, sin, attend, local)
            self._ffn_block(x, h, layer, next_norm, i)
        return h

    def _check_finite(self, finite: bool, where: str) -> None:
        """Stop at the first NaN or inf, naming where it appeared, rather than sample from garbage."""
        if not finite:
            raise NumericalError(f"{self.gguf.path}: {where} gave NaN or infinite values: "
                                 "the model's weights or hyperparameters are broken")

    def _attention_over(self, batch: Batch, placement, cache, exact: bool):
        """attend(out, q, kv, window): the attention kernel this batch takes, its visibility worked out once
        for all layers. Long prompts go through query blocks; everything else through the listed kernel."""
        hp = self.hp
        scale = np.float32(hp.attn_scale or 1.0 / math.sqrt(hp.head_dim))
        capped = np.float32(hp.attn_softcap)
        if len(batch) > SMALL_BATCH and placement.is_chain and not exact:
            keys, key_pos = placement.chain_keys()

            def attend(out, q, kv, window):
                kv.attend_chain(out, q, keys, key_pos, batch.positions, scale, window, capped)
        else:
            visible, counts = placement.visible_lists()

            def attend(out, q, kv, window):
                kv.attend_listed(out, q, visible, counts, batch.positions, scale, window, capped)
        return attend

    def _project(self, h: np.ndarray, weights: list[LaneMatrix], width: int) -> np.ndarray:
        if len(weights) == 1:  # fused (the usual case): no output slices
            return matmul(h, weights[0])
        out = np.empty((h.shape[0], width), np.float32)
        at = 0
        for w in weights:
            matmul(h, w, out=out[:, at : at + w.n_rows])
            at += w.n_rows
        return out

    def _attention_block(self, x, h, layer: Layer, i: int, cells, cache, cos, sin, attend, local: bool) -> None:
        """x += attention(h); h = x normed for the feed-forward block."""
        hp = self.hp
        n = x.shape[0]
        qkv = self._project(h, layer.wqkv, hp.q_dim + 2 * hp.kv_dim)
        q = np.empty((n, hp.n_head, hp.head_dim), np.float32)
        k = np.empty((n, hp.n_head_kv, hp.head_dim), np.float32)
        v = np.empty_like(k)
        split_heads(qkv, layer.bqkv, layer.q_norm, layer.k_norm, hp.norm_eps, cos, sin, hp.rope.neox, q, k, v)
        kv = cache.layer(i)
        kv.write(cells, k, v)
        att = np.empty_like(q)
        attend(att, q, kv, hp.sliding_window if local else 0)
        out = matmul(att.reshape(n, hp.q_dim), layer.wo)
        finite = add_block_output(x, out, layer.attn_post_norm, layer.ffn_norm, h, hp.norm_eps)
        self._check_finite(finite, f"layer {i}")

    def _ffn_block(self, x, h, layer: Layer, next_norm: np.ndarray, i: int) -> None:
        """x += feed_forward(h); h = x normed by next_norm."""
        hp = self.hp
        gate_up = self._project(h, layer.w_gate_up, 2 * hp.n_ff)
        act = np.empty((x.shape[0], hp.n_ff), np.float32)
        (geglu_tanh if hp.activation == "gelu" else swiglu)(act, gate_up)
        out = matmul(act, layer.w_down)
        finite = add_block_output(x, out, layer.ffn_post_norm, next_norm, h, hp.norm_eps)
        self._check_finite(finite, f"layer {i}")


def _return_freed_memory() -> None:
    """Hand the repacking's freed temporaries back to the OS (glibc keeps them in its heap otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
