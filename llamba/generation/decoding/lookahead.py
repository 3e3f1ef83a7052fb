"""Lookahead decoding: Jacobi iteration grows a pool of n-grams; the ones that start with the current token are
checked as guesses, in the same forward.

Each step's batch holds, beside the token being evaluated (the root) and its guesses, a window of W columns by
N - 1 levels of tokens the model is iterating on. Token (level l, column i) sits at position root + 1 + i + l
and sees the root, level 0 up to column i, and its own column below it: column i read bottom to top is a run
of consecutive positions. One forward predicts the token after every window token; the predictions after the
top level close one N-gram per column (column i plus its prediction), which joins the pool, and become the new
top level while the bottom one drops off (one Jacobi step). The pool is seeded from the prompt and fed by the
text as it is accepted, so it also knows what was said before.

Guesses are the line prompt lookup would copy (the longest recent n-gram seen before) and the pool's most recent
continuations of the root (up to G of them, N - 1 tokens each), merged into a tree where they share a start.
They are copied, not drawn, so verification is exact at any temperature. On a CPU every row costs compute, so
the window is small: see the benchmark for what it buys.
"""

from __future__ import annotations

import numpy as np

from .prompt_lookup import PromptLookup
from .speculative import Draft

WINDOW, NGRAM, CANDIDATES = 2, 3, 3  # W, N, G: the smallest window (every row costs compute on a CPU)


class Lookahead:
    name = "lookahead"

    def __init__(self, window: int = WINDOW, ngram: int = NGRAM, candidates: int = CANDIDATES, seed: int = 0):
        self.window, self.ngram, self.candidates = window, ngram, candidates
        self.extra_rows = window * (ngram - 1)  # what the controller adds to the cost of a guessing step
        self._rng = np.random.default_rng(seed)
        self._pool: dict[int, list[tuple[int, ...]]] = {}  # first token -> continuations, newest last
        self._seen: list[int] = []
        self._levels: list[list[int]] | None = None  # [N - 1][W] window tokens, level 0 first
        self._copier = PromptLookup()

    def reset(self) -> None:
        self._levels = None  # a new generation starts a new window; the pool keeps what it learnt

    def propose(self, context: list[int], k: int, sampler=None) -> Draft:
        self._learn(context)
        lines = [self._copier.propose(context, k).tokens] + self._pool.get(context[-1], [])[::-1][: self.candidates]
        tokens, parents = _tree(lines, k)
        n_guesses = len(tokens)
        if self._levels is None:  # start the iteration from tokens of the text itself
            self._levels = [list(self._rng.choice(context, self.window)) for _ in range(self.ngram - 1)]
        for level, row in enumerate(self._levels):
            for column, token in enumerate(row):
                tokens.append(int(token))
                if level:
                    parents.append(n_guesses + (level - 1) * self.window + column)
                else:
                    parents.append(n_guesses + column - 1 if column else -1)
        return Draft(tokens, parents=parents, n_guesses=n_guesses)

    def observe(self, draft: Draft, rows: np.ndarray) -> None:
        """One Jacobi step from the window rows' predictions: close an n-gram per column, shift the levels."""
        if len(draft.tokens) - draft.n_guesses != self.extra_rows:  # a plain step: no window was run
            return
        top = 1 + draft.n_guesses + (self.ngram - 2) * self.window
        predicted = [int(t) for t in np.argmax(rows[top : top + self.window], axis=1)]
        for column in range(self.window):
            gram = [row[column] for row in self._levels] + [predicted[column]]
            self._add(int(gram[0]), tuple(int(t) for t in gram[1:]))
        self._levels = self._levels[1:] + [predicted]

    # ------------------------------------------------------------------------------------------ the pool

    def _learn(self, context: list[int]) -> None:
        """Add the n-grams of the text not seen yet (a changed text starts the pool over)."""
        n_seen = len(self._seen)
        if context[:n_seen] != self._seen:
            self._pool, n_seen = {}, 0
        n = self.ngram
        for start in range(max(0, n_seen - n + 1), len(context) - n + 1):
            self._add(context[start], tuple(context[start + 1 : start + n]))
        self._seen = list(context)

    def _add(self, first: int, rest: tuple[int, ...]) -> None:
        grams = self._pool.setdefault(first, [])
        if rest in grams:
            grams.remove(rest)
        grams.append(rest)
        if len(grams) > 4 * self.candidates:
            del grams[0]


def _tree(lines: list, k: int) -> tuple[list[int], list[int]]:
    """Lines of guesses as one tree of at most k nodes (tokens, parents), shared starts merged, earlier lines
    first."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for line in lines:
        node = -1
        for token in line:
            nxt = children.get((node, token))
            if nxt is None:
                if len(tokens) >= k:
                    break
                nxt = children[(node, token)] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = nxt
    return tokens, parents
