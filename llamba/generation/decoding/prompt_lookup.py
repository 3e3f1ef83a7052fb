"""Prompt-lookup decoding: guesses copied from what followed the same words earlier in the prompt or output.

The longest recent n-gram (up to MAX_NGRAM tokens) that also occurred earlier is looked up in an index of
n-gram -> the position after its latest earlier occurrence; the tokens that followed it there are the guesses.
It costs no model at all and wins big where output repeats input: editing code, quoting, summarising. The
match's length is the guess's kind: on SmolLM2's benchmark answers the first guess after a 3-token match held
64-92% of the time, after a single token 13-43%, so the controller learns a rate for each.
"""

from __future__ import annotations

from .speculative import Draft

MAX_NGRAM = 3


class PromptLookup:
    name = "prompt-lookup"

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}
        self._seen: list[int] = []

    def _catch_up(self, context: list[int]) -> None:
        """Index the n-grams ending before the last token (a new context, or one that changed, starts over)."""
        n_seen = len(self._seen)
        if context[:n_seen] != self._seen:
            self.reset()
            n_seen = 0
        for end in range(max(n_seen, 1), len(context)):  # n-grams context[end - n : end], followed by context[end]
            for n in range(1, self.max_ngram + 1):
                if end - n >= 0:
                    self._index[tuple(context[end - n : end])] = end
        self._seen = list(context)

    def kind(self, context: list[int]) -> int | None:
        """How many tokens the match that would be copied from is long; None when nothing matches."""
        n, _ = self._longest_match(context)
        return n or None

    def propose(self, context: list[int], k: int, sampler=None) -> Draft:
        """Indexes the context's n-grams that end before its last position: the newest one is the query."""
        _, start = self._longest_match(context)
        return Draft(context[start : start + k] if start is not None else [])

    def _longest_match(self, context: list[int]) -> tuple[int, int | None]:
        """(length of the longest matching recent n-gram, where what followed it starts), or (0, None)."""
        prefix = context[:-1]
        self._catch_up(prefix)
        for n in range(self.max_ngram, 0, -1):
            if len(context) > n:
                at = self._index.get(tuple(context[-n:]))
                if at is not None:
                    return n, at
        return 0, None
