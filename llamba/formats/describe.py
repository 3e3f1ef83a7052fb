"""A model file summarised for people and scripts: what `llamba info` shows."""

from __future__ import annotations

from typing import Any

from .ggml_types import FILE_TYPES
from .gguf import GGUFFile

TOKENIZER_KINDS = {"gpt2": "BPE (byte-level, gpt2)", "llama": "SentencePiece (llama)"}


def describe(g: GGUFFile) -> dict[str, Any]:
    """Architecture, size, context, tokenizer and tensors of an open GGUF file, as plain JSON-able values."""
    tokens = g.get("tokenizer.ggml.tokens")
    file_type = g.get("general.file_type")
    return {
        "path": g.path,
        "gguf_version": g.version,
        "architecture": g.architecture,
        "name": g.get("general.name"),
        "parameters": sum(t.n_elements for t in g.tensors.values()),
        "context_length": g.arch_value("context_length"),
        "embedding_length": g.arch_value("embedding_length"),
        "block_count": g.arch_value("block_count"),
        "head_count": _plain(g.arch_value("attention.head_count")),
        "head_count_kv": _plain(g.arch_value("attention.head_count_kv")),
        "expert_count": g.arch_value("expert_count"),
        "expert_used_count": g.arch_value("expert_used_count"),
        "active_parameters": active_parameters(g),
        "tokenizer": g.get("tokenizer.ggml.model"),
        "tokenizer_pre": g.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens) if tokens is not None else None,
        "chat_template": "tokenizer.chat_template" in g.metadata,
        "file_type": FILE_TYPES.get(file_type, file_type) if file_type is not None else None,
        "file_bytes": len(g._map),
        "tensors": [
            {"name": t.name, "type": t.type.name, "shape": list(t.shape), "bytes": t.n_bytes}
            for t in g.tensors.values()
        ],
    }


def active_parameters(g: GGUFFile) -> int:
    """The parameters one token uses: of each stacked experts tensor [.., n_expert], only its experts'
    share (what decoding reads per token); every other tensor whole."""
    n_expert, n_used = g.arch_value("expert_count"), g.arch_value("expert_used_count")
    total = 0
    for t in g.tensors.values():
        stacked = len(t.shape) == 3 and isinstance(n_expert, int) and isinstance(n_used, int) and t.shape[2] == n_expert
        total += t.n_elements // n_expert * n_used if stacked else t.n_elements
    return total


def _plain(value: Any) -> Any:
    """Per-layer arrays (some models vary head counts by layer) become lists for JSON."""
    return value.tolist() if hasattr(value, "tolist") else value


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
