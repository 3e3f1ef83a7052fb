"""Draft-model speculative decoding: a smaller model with the same vocabulary guesses, the target checks.

The draft keeps its own KV cache, brought up to date with the context by evaluating only what it has not
seen. At temperature 0 it guesses its argmax; otherwise it draws from its own distribution (the same
samplers), and the target accepts by speculative sampling against those probabilities.
"""

from __future__ import annotations

from ...errors import LlambaError
from ...memory.kv_cache import KVCache
from ...memory.sequence import Sequence
from ..sampling import Sampler
from .speculative import Draft


class DraftModel:
    name = "draft"

    def __init__(self, draft_model, n_ctx: int, n_vocab: int, kv_type: str = "f32", label: str = "draft"):
        if draft_model.hp.n_vocab != n_vocab:
            raise LlambaError(f"{label}: its vocabulary ({draft_model.hp.n_vocab} tokens) differs from the "
                              f"model's ({n_vocab}); a draft model must share the vocabulary")
        self.model = draft_model
        self.name = f"draft:{label}"
        self.cache = KVCache.for_model(draft_model.hp, n_ctx, kv_type, key_stats=draft_model.key_stats)
        self.sequence = Sequence(self.cache)  # what the draft's cache holds

    def reset(self) -> None:
        pass  # the cache is reused across generations: only the differing tail is recomputed

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        logits = self._catch_up(context)
        greedy = sampler.params.temperature == 0
        tokens, probs, seen = [], [], list(context)
        for i in range(k):
            ids, p = sampler.distribution(logits, seen)
            token = int(ids[0]) if greedy else int(ids[sampler.rng.choice(len(ids), p=p)])
            tokens.append(token)
            probs.append((ids, p))
            seen.append(token)
            if i + 1 < k:
                logits = self.model.forward_tokens([token], len(seen) - 1, self.cache)
                self.sequence.extend([token])
        return Draft(tokens, None if greedy else probs)

    def _catch_up(self, context: list[int]):
        """The draft's logits after context, evaluating only the tokens its cache does not hold."""
        n = min(self.sequence.common_prefix(context), len(context) - 1)  # the last token runs for its logits
        self.sequence.keep(n)
        logits = self.model.forward_tokens(context[n:], n, self.cache)
        self.sequence.extend(context[n:])
        return logits
