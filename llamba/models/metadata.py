"""Hyperparameters from GGUF metadata, each read with its type and range checked.

Everything the kernels size their loops and arrays by comes through here, so a file whose metadata is wrong
(a head count of 0, RoPE dimensions past the head, a NaN epsilon, a string where a count belongs) fails at
load with the key and the reason, never deep in a kernel. The tensors' shapes are checked against these
values where the weights are loaded (`Transformer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import GGUFError, UnsupportedError
from ..formats.gguf import GGUFFile
from ..formats.keys import MetadataKeys
from ..ops.rope import RopeConfig
from .latent import LatentDims

# Generous bounds: far beyond any released model, small enough that no product of them overflows a kernel.
MAX_WIDTH = 1 << 16  # embedding, feed-forward and head widths
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 512  # llama.cpp's LLAMA_MAX_EXPERTS


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
    qk_norm: bool | str = False  # True: each head of Q and K normed (Qwen3, Gemma 3); "whole": all of Q, all of K
    post_norms: bool = False
    fused_gate_up: bool = False  # ffn_up holds the gate's rows, then the up rows (Phi-3)
    n_expert: int = 0  # mixture of experts: experts per layer (0: a dense model), and used per token
    n_expert_used: int = 0
    n_ff_exp: int = 0  # an expert's feed-forward width
    n_ff_shexp: int = 0  # the shared expert's (0: none)
    expert_norm: bool = False  # the chosen experts' weights rescaled to sum to one
    expert_weights_scale: float = 1.0  # and multiplied by this
    expert_sigmoid: bool = False  # experts scored by a sigmoid each, not a softmax over all (DeepSeek-V3)
    expert_groups: tuple[int, int] = (1, 1)  # (groups of experts, groups a token may use)
    shared_expert_gate: bool = False  # the shared expert scaled by a sigmoid gate (Qwen2-MoE)
    n_dense_lead: int = 0  # leading layers with a dense feed-forward block (DeepSeek)
    mla: LatentDims | None = None  # latent attention (DeepSeek-V2): n_head_kv 1, head_dim its cached width

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim


def arch_keys(g: GGUFFile) -> MetadataKeys:
    """The reader of `{arch}.*` keys."""
    return MetadataKeys(g.metadata, g.path, f"{g.architecture}.")


def read_common(g: GGUFFile, neox: bool, latent: bool = False) -> HParams:
    """The hyperparameters every family stores under `{arch}.*`, with llama.cpp's defaults. latent: values
    narrower than keys are the latent attention's (its caller checks them)."""
    keys = arch_keys(g)
    n_embd = keys.count("embedding_length")
    n_head = keys.count("attention.head_count", high=MAX_HEADS)
    n_head_kv = keys.count("attention.head_count_kv", n_head, high=n_head)
    if n_head % n_head_kv:
        raise keys.fail("attention.head_count_kv", n_head_kv, f"does not divide the head count {n_head}")
    head_dim = keys.count("attention.key_length", max(n_embd // n_head, 1))
    value_dim = keys.count("attention.value_length", head_dim)
    if value_dim != head_dim and not latent:
        raise UnsupportedError(f"{g.path}: value heads of {value_dim} differ from key heads of {head_dim}; not supported")
    n_ctx_train = keys.count("context_length", 2048, high=MAX_CONTEXT)
    return HParams(
        arch=g.architecture, n_vocab=_vocab_size(g, keys), n_embd=n_embd,
        n_layer=keys.count("block_count", high=MAX_LAYERS), n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=keys.count("feed_forward_length", high=MAX_WIDTH * 8), n_ctx_train=n_ctx_train,
        norm_eps=keys.real("attention.layer_norm_rms_epsilon", 1e-5, high=1.0, above_low=True),
        rope=read_rope(g, keys, head_dim, neox, n_ctx_train),
    )


def read_experts(g: GGUFFile, hp: HParams, normalize: bool, shared: bool = False, split_ff: bool = True) -> HParams:
    """The mixture-of-experts keys, `{arch}.expert_count` and the rest, into hp (a model without them stays
    dense). Without `expert_feed_forward_length` an expert is feed_forward_length wide, divided by the
    experts used if split_ff (llama.cpp's Qwen-MoE default)."""
    keys = arch_keys(g)
    hp.n_expert = keys.count("expert_count", 0, low=0, high=MAX_EXPERTS)
    if not hp.n_expert:
        return hp
    hp.n_expert_used = keys.count("expert_used_count", high=hp.n_expert)
    default_width = max(hp.n_ff // hp.n_expert_used, 1) if split_ff else hp.n_ff
    hp.n_ff_exp = keys.count("expert_feed_forward_length", default_width, high=MAX_WIDTH * 8)
    if shared:
        hp.n_ff_shexp = keys.count("expert_shared_feed_forward_length", hp.n_ff, high=MAX_WIDTH * 8)
    hp.expert_norm = normalize
    return hp


def _vocab_size(g: GGUFFile, keys: MetadataKeys) -> int:
    """The vocabulary's size: the token list's (what llama.cpp uses), else a vocab_size key, else the
    embedding's rows."""
    tokens = g.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        return len(tokens)
    if g.arch_value("vocab_size") is not None:
        return keys.count("vocab_size", high=MAX_VOCAB)
    embd = g.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise GGUFError(f"{g.path}: the vocabulary size is unknown (no tokens, no vocab_size, no token_embd.weight)")
    return embd.shape[1]


def read_rope(g: GGUFFile, keys: MetadataKeys, head_dim: int, neox: bool, n_ctx_train: int) -> RopeConfig:
    scaling = keys.text("rope.scaling.type", "none")
    written = keys.raw("rope.scaling.factor", None)
    factor = 1.0
    if written is not None and not (isinstance(written, (int, float)) and written == 0):  # 0: "none" to some converters
        factor = keys.real("rope.scaling.factor", high=1e6, above_low=True)
    if g.arch_value("rope.freq_scale") is not None:  # older files store 1/factor
        factor = 1.0 / keys.real("rope.freq_scale", low=1e-6)
        scaling = "linear" if scaling == "none" else scaling
    if scaling not in ("none", "linear", "yarn", "llama3"):
        raise UnsupportedError(f"{g.path}: RoPE scaling {scaling!r} is not supported")
    n_rot = keys.count("rope.dimension_count", head_dim, high=head_dim)
    if n_rot % 2:
        raise keys.fail("rope.dimension_count", n_rot, "must be even (RoPE rotates pairs)")
    freq_factors = None
    if "rope_freqs.weight" in g.tensors:  # llama 3.1+ ships its long-context frequency divisors
        freq_factors = _freq_factors(g, n_rot)
        scaling = "none" if scaling == "llama3" else scaling
    return RopeConfig(
        n_rot=n_rot,
        base=keys.real("rope.freq_base", 10000.0, above_low=True),
        neox=neox,
        scaling=scaling,
        factor=factor,
        n_ctx_orig=keys.count("rope.scaling.original_context_length", n_ctx_train, high=MAX_CONTEXT),
        yarn_attn_factor=keys.real("rope.scaling.attn_factor", 1.0, high=1e3, above_low=True),
        freq_factors=freq_factors,
    )


def _freq_factors(g: GGUFFile, n_rot: int) -> tuple[float, ...]:
    t = g.tensors["rope_freqs.weight"]
    values = np.asarray(t.data).reshape(-1) if t.type.name == "F32" else None
    if values is None or values.size != n_rot // 2 or not np.isfinite(values).all() or (values <= 0).any():
        raise GGUFError(f"{g.path}: tensor rope_freqs.weight must hold {n_rot // 2} positive finite F32 values")
    return tuple(float(f) for f in values)
