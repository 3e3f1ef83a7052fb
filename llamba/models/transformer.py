"""The decoder-only transformer every supported family shares, built from ops.

An architecture module reads its hyperparameters from GGUF metadata into `HParams` (which features it uses:
QKV bias, QK-norm, post-norms, GELU, sliding windows, scaled embeddings) and `Transformer` runs the layer recipe:

    x = embed(tokens) * embed_scale                                        # [n_tokens, n_embd]
    per layer:  h = norm(x);  q, k, v = split(h @ Wqkv + b);  [q, k = norm per head];  rope(q, k)
                x += [post_norm](attention(q, cache(k, v)) @ Wo)
                h = norm(x);  x += [post_norm](ffn(h))
    logits = norm(x) @ Wout                                                # [n_tokens, n_vocab]

The feed-forward block is one of models/ffn.py's: dense, act(h @ Wgate) * (h @ Wup) @ Wdown, or a mixture of
experts; DeepSeek-V2 replaces the attention by models/latent.py's latent attention.
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
from ..ops.activations import softcap
from ..ops.matmul import SMALL_BATCH, gather_rows, matmul
from ..ops.heads import norm_qk_whole, split_heads
from ..ops.norm import NO_WEIGHT, add_block_output, all_finite, rmsnorm
from ..ops.repack import LaneMatrix, WeightArena, lanes_nbytes, leading_rows, stack_lanes, stack_runs
from ..ops.rope import rope_tables
from ..ops.threads import ThreadGovernor
from .ffn import DenseFFN, ExpertFFN, stacked_lanes_nbytes, load_experts, project
from .latent import LatentAttention, load_latent
from .metadata import HParams


HIDDEN_ONLY = -1  # the thread governor's variant for forwards without the output projection (measured apart)


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
    ffn: DenseFFN | ExpertFFN
    q_norm: np.ndarray
    k_norm: np.ndarray
    attn_post_norm: np.ndarray
    ffn_post_norm: np.ndarray
    latent: LatentAttention | None = None  # latent attention (DeepSeek-V2) in place of wqkv, wo

    @property
    def matrices(self) -> list[LaneMatrix]:
        attention = self.latent.matrices if self.latent else [*self.wqkv, self.wo]
        return [*attention, *self.ffn.matrices]


class Transformer:
    """A loaded model: `forward(batch, cache)` returns logits for the batch rows that want them."""

    def __init__(self, g: GGUFFile, hp: HParams):
        self.gguf = g
        self.hp = hp
        tied = "output.weight" not in g.tensors
        repacked = [t for name, t in g.tensors.items() if len(t.shape) == 2 and (tied or name != "token_embd.weight")]
        experts = [t for t in g.tensors.values() if len(t.shape) == 3]
        self._arena = WeightArena(sum(lanes_nbytes(t.type, t.n_rows, t.shape[0]) for t in repacked)
                                  + sum(stacked_lanes_nbytes(t) for t in experts))
        self.allocate = self._arena.zeros  # where load_experts repacks into
        self.output_norm = self.vector("output_norm.weight", hp.n_embd)
        if tied:
            self.output = self.matrix("token_embd.weight", hp.n_embd, hp.n_vocab)
            self.tok_embd = LaneRows(self.output)
        else:
            self.tok_embd = FileRows(self.tensor("token_embd.weight", (hp.n_embd, hp.n_vocab)))
            self.output = self.matrix("output.weight", hp.n_embd, hp.n_vocab)
        self.layers = [self._layer(i) for i in range(hp.n_layer)]
        del self._arena, self.allocate  # the mapping lives on in the weights' arrays
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

    def tensor(self, name: str, shape: tuple[int, ...]):
        t = self.gguf.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.gguf.path}: tensor {name} is missing (is this really a {self.hp.arch} model?)")
        if _squeezed(t.shape) != _squeezed(shape):  # [n, 1] and [n] are one shape (llama.cpp reads both)
            raise GGUFError(f"{self.gguf.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape} "
                            "from the metadata")
        return t

    def vector(self, name: str, n: int) -> np.ndarray:
        t = self.tensor(name, (n,))
        if t.type.name != "F32":
            return dequantize(t.data, t.type).reshape(-1)
        # a copy, not a view: the file's pages are released after loading and a view would fault them back
        return np.array(t.data, dtype=np.float32).reshape(-1)

    def _optional_vector(self, name: str, n: int) -> np.ndarray:
        return self.vector(name, n) if name in self.gguf.tensors else NO_WEIGHT

    def matrix(self, name: str, n_cols: int, n_rows: int) -> LaneMatrix:
        return self._fused([(name, n_rows)], n_cols)[0]

    def _fused(self, shapes: list[tuple[str, int]], n_cols: int) -> list[LaneMatrix]:
        """The matrices as few as possible: each run of neighbours that share a layout stacked into one."""
        tensors = [self.tensor(name, (n_cols, n_rows)) for name, n_rows in shapes]
        runs = stack_runs([(t.data.reshape(n_rows, -1), t.type) for t, (_, n_rows) in zip(tensors, shapes)])
        matrices = [stack_lanes(run, n_cols, self._arena.zeros) for run in runs]
        for t in tensors:
            self.gguf.release_pages(t)
        return matrices

    def _layer(self, i: int) -> Layer:
        hp, p = self.hp, f"blk.{i}."
        if hp.mla is not None:
            latent = load_latent(self, p, hp.mla, hp.n_head, hp.n_embd, hp.norm_eps)
            return Layer(attn_norm=self.vector(p + "attn_norm.weight", hp.n_embd), wqkv=[], bqkv=NO_WEIGHT,
                         wo=latent.wo, ffn_norm=self.vector(p + "ffn_norm.weight", hp.n_embd), ffn=self._ffn(p, i),
                         q_norm=NO_WEIGHT, k_norm=NO_WEIGHT, attn_post_norm=NO_WEIGHT, ffn_post_norm=NO_WEIGHT,
                         latent=latent)
        q, kv, d = hp.q_dim, hp.kv_dim, hp.head_dim
        whole = hp.qk_norm == "whole"  # OLMoE: one norm over all of Q, one over all of K
        biases = [self._optional_vector(p + f"attn_{x}.bias", n) for x, n in (("q", q), ("k", kv), ("v", kv))]
        return Layer(
            attn_norm=self.vector(p + "attn_norm.weight", hp.n_embd),
            wqkv=self._qkv(p),
            bqkv=np.concatenate(biases) if all(b.size for b in biases) else NO_WEIGHT,
            wo=self.matrix(p + "attn_output.weight", q, hp.n_embd),
            ffn_norm=self.vector(p + "ffn_norm.weight", hp.n_embd),
            ffn=self._ffn(p, i),
            q_norm=self.vector(p + "attn_q_norm.weight", q if whole else d) if hp.qk_norm else NO_WEIGHT,
            k_norm=self.vector(p + "attn_k_norm.weight", kv if whole else d) if hp.qk_norm else NO_WEIGHT,
            attn_post_norm=self._optional_vector(p + "post_attention_norm.weight", hp.n_embd) if hp.post_norms else NO_WEIGHT,
            ffn_post_norm=self._optional_vector(p + "post_ffw_norm.weight", hp.n_embd) if hp.post_norms else NO_WEIGHT,
        )

    def _qkv(self, p: str) -> list[LaneMatrix]:
        """Q, K and V: one matrix as the file fuses them (Phi-3's attn_qkv), else stacked as their types allow."""
        hp = self.hp
        if p + "attn_qkv.weight" in self.gguf.tensors:
            return [self.matrix(p + "attn_qkv.weight", hp.n_embd, hp.q_dim + 2 * hp.kv_dim)]
        names = [(p + "attn_q.weight", hp.q_dim), (p + "attn_k.weight", hp.kv_dim), (p + "attn_v.weight", hp.kv_dim)]
        return self._fused(names, hp.n_embd)

    def _ffn(self, p: str, i: int) -> DenseFFN | ExpertFFN:
        """Layer i's feed-forward block: dense (all of a dense model's; DeepSeek's leading ones), or a mixture
        of experts, with a shared expert where the file has one (Qwen2-MoE's gated by the router's extra row)."""
        hp = self.hp
        if not hp.n_expert or i < hp.n_dense_lead:
            return self._dense_ffn(p, "", hp.n_ff)
        experts = load_experts(self, p, hp.n_expert, hp.n_embd, hp.n_ff_exp, hp.activation)
        router = [(p + "ffn_gate_inp.weight", hp.n_expert)]
        shared = None
        if hp.n_ff_shexp:
            shared = self._dense_ffn(p, "_shexp", hp.n_ff_shexp)
            if hp.shared_expert_gate:
                router.append((p + "ffn_gate_inp_shexp.weight", 1))
        bias = self._optional_vector(p + "exp_probs_b.bias", hp.n_expert)  # DeepSeek-V3's selection bias
        return ExpertFFN(self._fused(router, hp.n_embd), experts, hp.n_expert_used, hp.expert_norm, shared,
                         hp.expert_weights_scale, hp.expert_sigmoid, bias, hp.expert_groups)

    def _dense_ffn(self, p: str, suffix: str, n_ff: int) -> DenseFFN:
        """Gate and up stacked as their types allow, or the one ffn_up holding both (Phi-3)."""
        if self.hp.fused_gate_up and suffix == "":
            gate_up = [self.matrix(p + "ffn_up.weight", self.hp.n_embd, 2 * n_ff)]
        else:
            gate_up = self._fused([(p + f"ffn_gate{suffix}.weight", n_ff), (p + f"ffn_up{suffix}.weight", n_ff)],
                                  self.hp.n_embd)
        return DenseFFN(gate_up, self.matrix(p + f"ffn_down{suffix}.weight", n_ff, self.hp.n_embd), self.hp.activation)

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, batch: Batch, cache, exact: bool = False, skip: frozenset[int] = frozenset(),
                vocab: int | None = None) -> np.ndarray:
        """Run a batch through the model, its K/V joining the cache; returns float32 logits [n_rows, n_vocab]
        for the rows with want_logits, in batch order.

        The one path for prompts, guesses and several sequences. The matrix kernels are batch invariant;
        attention is too (each token walks its own visibility list), except that a single chain of more than
        SMALL_BATCH tokens (a long prompt) takes blocks of register-blocked products, 15-20% faster at 512
        tokens, whose bits depend on where the prompt was split. exact: never that path, so every token's
        logits are bit-identical however the batches were cut (what the server promises). skip: layers left
        out (the model as its own cheaper draft; those layers' cache cells are left unwritten). vocab: the
        logits of the first `vocab` tokens only (rounded up to whole chunks of rows): a draft model's guesses
        need only the frequent tokens, and the output matrix is over a third of what a small model reads.
        """
        batch.validate(self.hp.n_vocab)
        with self.threads.run(len(batch), variant=len(skip)):
            return self._forward(batch, cache, exact, skip, vocab)

    def hidden_states(self, batch: Batch, cache) -> np.ndarray:
        """Every batch token's final hidden state [n_tokens, n_embd], after the output norm: the row the output
        matrix would read (llama.cpp's t_embd, what its embeddings pool). Exact, as forward(exact=True): a
        token's row is bit-identical however the batches were cut and whatever else they hold."""
        batch.validate(self.hp.n_vocab)
        with self.threads.run(len(batch), variant=HIDDEN_ONLY):
            return self._normed_stream(batch, cache, exact=True, skip=frozenset())

    def _normed_stream(self, batch: Batch, cache, exact: bool, skip: frozenset[int]) -> np.ndarray:
        placement = cache.place(batch)
        try:
            return self._layers(batch, placement, cache, exact, skip)
        except BaseException:
            cache.remove_cells(placement.cells)  # a failed pass leaves nothing behind
            raise

    def _forward(self, batch: Batch, cache, exact: bool, skip: frozenset[int], vocab: int | None) -> np.ndarray:
        hp = self.hp
        h = self._normed_stream(batch, cache, exact, skip)
        logits = matmul(h[batch.want_logits], self.output if vocab is None else leading_rows(self.output, vocab))
        if hp.final_softcap:
            softcap(logits, hp.final_softcap)
        self._check_finite(all_finite(logits), "the output projection")
        return logits

    def forward_tokens(self, tokens, start_pos: int, cache, all_logits: bool = False, logits_from: int = 0,
                       skip: frozenset[int] = frozenset(), vocab: int | None = None) -> np.ndarray:
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
        logits = self.forward(batch, cache, skip=skip, vocab=vocab)
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
            if layer.latent is not None:
                self._latent_block(x, h, layer, i, placement.cells, cache, cos, sin, attend)
            else:
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

    def _attention_block(self, x, h, layer: Layer, i: int, cells, cache, cos, sin, attend, local: bool) -> None:
        """x += attention(h); h = x normed for the feed-forward block."""
        hp = self.hp
        n = x.shape[0]
        qkv = project(h, layer.wqkv)
        q = np.empty((n, hp.n_head, hp.head_dim), np.float32)
        k = np.empty((n, hp.n_head_kv, hp.head_dim), np.float32)
        v = np.empty_like(k)
        if hp.qk_norm == "whole":  # OLMoE: one norm over all of Q and one over all of K, before the heads
            norm_qk_whole(qkv, layer.q_norm, layer.k_norm, hp.norm_eps)
            split_heads(qkv, layer.bqkv, NO_WEIGHT, NO_WEIGHT, hp.norm_eps, cos, sin, hp.rope.neox, q, k, v)
        else:
            split_heads(qkv, layer.bqkv, layer.q_norm, layer.k_norm, hp.norm_eps, cos, sin, hp.rope.neox, q, k, v)
        kv = cache.layer(i)
        kv.write(cells, k, v)
        att = np.empty_like(q)
        attend(att, q, kv, hp.sliding_window if local else 0)
        out = matmul(att.reshape(n, hp.q_dim), layer.wo)
        finite = add_block_output(x, out, layer.attn_post_norm, layer.ffn_norm, h, hp.norm_eps)
        self._check_finite(finite, f"layer {i}")

    def _latent_block(self, x, h, layer: Layer, i: int, cells, cache, cos, sin, attend) -> None:
        """x += latent_attention(h); h = x normed for the feed-forward block."""
        out = layer.latent(h, cache.layer(i), cells, cos, sin, attend)
        finite = add_block_output(x, out, NO_WEIGHT, layer.ffn_norm, h, self.hp.norm_eps)
        self._check_finite(finite, f"layer {i}")

    def _ffn_block(self, x, h, layer: Layer, next_norm: np.ndarray, i: int) -> None:
        """x += feed_forward(h); h = x normed by next_norm."""
        out = layer.ffn(h)
        finite = add_block_output(x, out, layer.ffn_post_norm, next_norm, h, self.hp.norm_eps)
        self._check_finite(finite, f"layer {i}")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A GGUF shape without its trailing ones."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _return_freed_memory() -> None:
    """Hand the repacking's freed temporaries back to the OS (glibc keeps them in its heap otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
