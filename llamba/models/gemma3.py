"""Gemma 3: interleaved sliding-window and global attention layers with their own RoPE bases, QK-norm,
norms before and after both blocks, GELU-tanh FFN, embeddings scaled by sqrt(n_embd), tied output.

The norm weights in GGUF already include Gemma's "+1", so they are applied like any RMSNorm weight.
"""

import dataclasses
import math

from ..formats.gguf import GGUFFile
from .metadata import MAX_CONTEXT, HParams, arch_keys, read_common

SWA_PATTERN = 6  # five sliding-window layers, then one global one
LOCAL_ROPE_BASE = 10000.0


def hparams(g: GGUFFile) -> HParams:
    hp = read_common(g, neox=True)
    hp.qk_norm = True
    hp.post_norms = True
    hp.activation = "gelu"
    hp.embed_scale = math.sqrt(hp.n_embd)
    keys = arch_keys(g)
    hp.sliding_window = keys.count("attention.sliding_window", 0, low=0, high=MAX_CONTEXT)
    if hp.sliding_window:
        hp.swa_layers = [i % SWA_PATTERN < SWA_PATTERN - 1 for i in range(hp.n_layer)]
        hp.rope_local = dataclasses.replace(hp.rope, base=LOCAL_ROPE_BASE, scaling="none", factor=1.0)
    else:
        hp.final_softcap = keys.real("final_logit_softcapping", 0.0)
    # Gemma 3 27B scales queries by the model width per head; the others by the head size.
    hp.attn_scale = 1.0 / math.sqrt(hp.n_embd / hp.n_head if hp.n_layer == 62 else hp.head_dim)
    return hp
