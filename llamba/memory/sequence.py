"""Sequence: the tokens one sequence of a KV cache holds, position by position.

It is the only record of them: the API object, a draft model and each server slot own a Sequence rather than a
list of their own, so "what does the cache hold" has one answer and keeping it in step with the cache is done
in one place (prefix reuse, trimming, saved sessions).
"""

from __future__ import annotations

import numpy as np

from ..errors import LlambaError
from .kv_cache import KVCache


class Sequence:
    def __init__(self, cache: KVCache, seq: int = 0):
        self.cache = cache
        self.seq = seq
        self._tokens: list[int] = []

    @property
    def tokens(self) -> list[int]:
        """The tokens at positions 0 .. len - 1 (a copy: change them through the methods)."""
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of ids the cache already holds (those need no evaluation)."""
        n = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            n += 1
        return n

    def keep(self, n: int) -> None:
        """Forget every position from n on, in the cache too (0: the whole sequence)."""
        self.cache.remove(self.seq, max(0, n))
        del self._tokens[max(0, n) :]

    def share(self, other: "Sequence", n: int) -> None:
        """Hold other's first n positions instead of what this sequence held: the same cells, no copy and no
        evaluation (a prompt prefix another sequence computed). Either may later go its own way; a cell is
        freed when neither holds it."""
        if other.cache is not self.cache:
            raise LlambaError("a sequence can share positions only with another sequence of its own cache")
        self.keep(0)
        self.cache.copy_seq(other.seq, self.seq, 0, n)
        self._tokens = other._tokens[:n]

    def extend(self, tokens) -> None:
        """Record tokens the model has just evaluated at the next positions."""
        self._tokens.extend(int(t) for t in tokens)

    def evaluated(self, ids: list[int]) -> None:
        """ids were fed from position 0 on, and the cache holds as many of them as it has positions (the last
        sampled token of a generation is never evaluated)."""
        self._tokens = [int(t) for t in ids[: self.cache.seq_length(self.seq)]]

    def forget(self) -> None:
        """The cache's contents no longer belong to any tokens we know of (computed another way): the next
        evaluation starts at position 0, overwriting them."""
        self._tokens = []

    def restore(self, tokens: list[int], keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Replace the sequence with saved tokens and their keys and values (as the cache's read_seq gives them)."""
        self.cache.write_seq(self.seq, keys, values)
        self._tokens = [int(t) for t in tokens]
