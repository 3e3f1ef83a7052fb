"""A batch of tokens for one forward pass, in the manner of llama.cpp's `llama_batch`.

Prefill, verification of guessed tokens and several users served together are all the same thing: tokens with
their positions, the sequence each belongs to, and which rows want logits. What a token may attend to follows
from that and from one more field, its parent:

- every cached cell of its own sequence (cells already in the KV cache before this batch), and
- its chain of ancestors inside the batch (parent, the parent's parent, ...), and itself.

A prompt is a chain (each token's parent is the one before it); a tree of guesses gives each guess the node it
continues; independent sequences are separate chains with their own sequence ids. Parent -1 means the token
continues only what the cache holds for its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LlambaError

MAX_SEQUENCES = 64  # sequence membership is a bit mask per cache cell


@dataclass
class Batch:
    tokens: np.ndarray  # [n] int64 token ids
    positions: np.ndarray  # [n] int64 positions in their sequence
    seq_ids: np.ndarray  # [n] int64 sequence of each token, 0 .. MAX_SEQUENCES - 1
    parents: np.ndarray  # [n] int64 index of the batch token each continues, or -1 (the cached sequence)
    want_logits: np.ndarray  # [n] bool: rows whose logits the forward returns, in batch order

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens, start_pos: int, seq: int = 0, logits: str = "last") -> "Batch":
        """Tokens that follow one another in one sequence from start_pos (a prompt, or a line of guesses).
        logits: "last", "all" or "none"."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = len(tokens)
        want = np.zeros(n, bool)
        if logits == "all":
            want[:] = True
        elif logits == "last" and n:
            want[-1] = True
        return cls(tokens, np.arange(start_pos, start_pos + n, dtype=np.int64), np.full(n, seq, np.int64),
                   np.arange(-1, n - 1, dtype=np.int64), want)

    @classmethod
    def join(cls, parts: list["Batch"]) -> "Batch":
        """Several batches as one (parents renumbered), e.g. one decode step of several sequences."""
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        parents = [np.where(p.parents >= 0, p.parents + off, -1) for p, off in zip(parts, offsets)]
        return cls(*(np.concatenate(arrays) for arrays in (
            [p.tokens for p in parts], [p.positions for p in parts], [p.seq_ids for p in parts], parents,
            [p.want_logits for p in parts])))

    def validate(self, n_vocab: int) -> None:
        n = len(self.tokens)
        if n == 0:
            raise LlambaError("a batch needs at least one token")
        if any(len(a) != n for a in (self.positions, self.seq_ids, self.parents, self.want_logits)):
            raise LlambaError("batch fields differ in length")
        if self.tokens.min() < 0 or self.tokens.max() >= n_vocab:
            raise LlambaError(f"token id out of range 0..{n_vocab - 1}")
        if self.seq_ids.min() < 0 or self.seq_ids.max() >= MAX_SEQUENCES:
            raise LlambaError(f"sequence ids must be in 0..{MAX_SEQUENCES - 1}")
        if self.positions.min() < 0:
            raise LlambaError("positions must be >= 0")
        idx = np.arange(n)
        has_parent = self.parents >= 0
        if (self.parents >= idx).any():
            raise LlambaError("a batch token's parent must come before it")
        parent = self.parents[has_parent]
        if (self.seq_ids[parent] != self.seq_ids[has_parent]).any():
            raise LlambaError("a batch token's parent must be in the same sequence")
        if (self.positions[parent] + 1 != self.positions[has_parent]).any():
            raise LlambaError("a batch token must sit one position after its parent")
