"""Tiny random models of each architecture, written to GGUF with the `gguf` package's writer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from llamba.formats import quants
from tests.blocks import random_blocks
from tests.tiny_vocab import add_vocab

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, HEAD_DIM, N_VOCAB = 256, 512, 4, 2, 64, 300
GGUF_TYPES = {t.name: t for t in gguf.GGMLQuantizationType}


def _add_matrix(w: gguf.GGUFWriter, name: str, values: np.ndarray, type_name: str) -> None:
    """values [rows, cols] float32, stored as type_name (quantized with llamba's tested quantizers)."""
    if type_name == "F32":
        w.add_tensor(name, values.astype(np.float32))
    elif type_name == "F16":
        w.add_tensor(name, values.astype(np.float16))
    elif type_name in quants.QUANTIZABLE:
        w.add_tensor(name, quants.quantize(values, type_name), raw_dtype=GGUF_TYPES[type_name])
    else:  # no quantizer for this type: random blocks, scaled down to the size of real weights
        rows, cols = values.shape
        raw = random_blocks(type_name, np.random.default_rng(rows * cols), rows * cols // 256).reshape(rows, -1)
        w.add_tensor(name, _shrink_scales(raw, type_name), raw_dtype=GGUF_TYPES[type_name])


def write_tiny_model(path: Path, arch: str, types: dict[str, str] | None = None, n_layer: int = 2,
                     sliding_window: int = 4, seed: int = 0, vocab: str | None = None) -> Path:
    """A random `arch` model; `types` maps weight roles (embd, q, k, v, o, gate, up, down) to GGML types;
    vocab ("bpe" or "spm") adds a vocabulary and chat template, so the file loads as a whole `Llama`."""
    types = {"embd": "Q8_0", "q": "Q4_K", "k": "Q5_0", "v": "Q8_0", "o": "Q6_K", "gate": "Q4_1",
             "up": "Q5_K", "down": "Q4_0", **(types or {})}
    rng = np.random.default_rng(seed)
    rand = lambda *shape, scale=0.08: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    norm = lambda n: (1.0 + rand(n, scale=0.1)).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_uint32(f"{arch}.context_length", 512)
    w.add_uint32(f"{arch}.embedding_length", N_EMBD)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", N_FF)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_uint32(f"{arch}.attention.head_count_kv", N_HEAD_KV)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0 if arch != "gemma3" else 1e6)
    if vocab is not None:
        add_vocab(w, vocab, N_VOCAB)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.key_length", HEAD_DIM)
        w.add_uint32(f"{arch}.attention.value_length", HEAD_DIM)
        w.add_uint32(f"{arch}.attention.sliding_window", sliding_window)
    _add_matrix(w, "token_embd.weight", rand(N_VOCAB, N_EMBD, scale=0.5), types["embd"])
    w.add_tensor("output_norm.weight", norm(N_EMBD))
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(N_EMBD))
        _add_matrix(w, p + "attn_q.weight", rand(q_dim, N_EMBD), types["q"])
        _add_matrix(w, p + "attn_k.weight", rand(kv_dim, N_EMBD), types["k"])
        _add_matrix(w, p + "attn_v.weight", rand(kv_dim, N_EMBD), types["v"])
        _add_matrix(w, p + "attn_output.weight", rand(N_EMBD, q_dim), types["o"])
        w.add_tensor(p + "ffn_norm.weight", norm(N_EMBD))
        _add_matrix(w, p + "ffn_gate.weight", rand(N_FF, N_EMBD), types["gate"])
        _add_matrix(w, p + "ffn_up.weight", rand(N_FF, N_EMBD), types["up"])
        _add_matrix(w, p + "ffn_down.weight", rand(N_EMBD, N_FF), types["down"])
        if arch == "qwen2":
            for name, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                w.add_tensor(p + f"attn_{name}.bias", rand(dim, scale=0.2))
        if arch in ("qwen3", "gemma3"):
            w.add_tensor(p + "attn_q_norm.weight", norm(HEAD_DIM))
            w.add_tensor(p + "attn_k_norm.weight", norm(HEAD_DIM))
        if arch == "gemma3":
            w.add_tensor(p + "post_attention_norm.weight", norm(N_EMBD))
            w.add_tensor(p + "post_ffw_norm.weight", norm(N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _shrink_scales(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Divide the float16 super-block scales of Q2_K / Q3_K blocks so weights come out near 0.05."""
    fields = {"Q2_K": (84, [80, 82]), "Q3_K": (110, [108])}[type_name]
    size, offsets = fields
    blocks = raw.reshape(-1, size).copy()
    for at in offsets:
        d = blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32) / 50
        blocks[:, at : at + 2] = d.astype(np.float16).view(np.uint8)
    return blocks.reshape(raw.shape)
