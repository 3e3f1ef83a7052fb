"""`auto`: copy from the context where it matches, and ask a draft model where it does not (when one is set).

Prompt lookup costs nothing and wins big where the answer copies its input (editing code, quoting); a draft
model costs a forward of its own per guess and wins where nothing can be copied (chat, prose), if it agrees
with the target often enough. Each step takes the copy when the context offers a match of at least
COPY_MATCH tokens (after one token the copy held 13-43% of the time on SmolLM2's answers, after three 64-92%),
and the draft model otherwise. The controller keeps an acceptance rate and a drafting cost per kind of guess,
so it stops asking the draft model where its guesses do not pay (k = 0, a plain step, with rare probes).
"""

from __future__ import annotations

from .prompt_lookup import PromptLookup
from .speculative import Draft

COPY_MATCH = 2
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

    def kind(self, context: list[int]):
        match = self.lookup.kind(context)
        if self.draft is None or (match or 0) >= COPY_MATCH:
            return match
        return DRAFT

    def propose(self, context: list[int], k: int, sampler) -> Draft:
        if self.kind(context) == DRAFT:
            return self.draft.propose(context, k, sampler)
        return self.lookup.propose(context, k, sampler)
