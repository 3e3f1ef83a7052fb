"""`auto`: copy from the context where it matches, and ask a draft model where that pays (when one is set).

Prompt lookup costs nothing and wins big where the answer copies its input (editing code, quoting); a draft
model costs a forward of its own per guess and wins where nothing can be copied (chat, prose), if it agrees
with the target often enough. Each step offers the controller both kinds of guess, a copy after a match of n
tokens (its kind is n) and the draft model's; the controller keeps an acceptance rate and a drafting cost per
kind, and takes the one expected to give the most tokens per second (or neither: a plain step, with rare
probes).
"""

from __future__ import annotations

from .prompt_lookup import PromptLookup
from .speculative import Draft

DRAFT = "draft"  # the kind of the draft model's guesses (prompt lookup's kinds are match lengths)


class AutoDrafter:
    name = "auto"

    def __init__(self, lookup: PromptLookup, draft=None):
        self.lookup = lookup
        self.draft = draft
        if draft is not None:
            self.name = f"auto+{draft.name}"

    def reset(self) -> None:
        self.lookup.reset()
        if self.draft is not None:
            self.draft.reset()

    def kinds(self, context: list[int]) -> list:
        match = self.lookup.kind(context)
        return ([match] if match else []) + ([DRAFT] if self.draft is not None else [])

    def lag(self, context: list[int], kind) -> int:
        """Tokens to evaluate before guessing: the draft model's catch-up (copying needs none)."""
        return self.draft.lag(context) if kind == DRAFT else 0

    def propose(self, context: list[int], k: int, sampler, kind) -> Draft:
        if kind == DRAFT:
            return self.draft.propose(context, k, sampler)
        return self.lookup.propose(context, k, sampler)
