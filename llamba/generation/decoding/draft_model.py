"""Draft-model speculative decoding: a smaller model with the same vocabulary guesses, the target checks.

The draft keeps its own KV cache, brought up to date with the context by evaluating only what it has not
seen. At temperature 0 it guesses its argmax; otherwise it draws from its own distribution (the same
samplers), and the target accepts by speculative sampling against those probabilities. Greedy, it stops
guessing at the first token it is not sure of (probability under MIN_CONFIDENCE; llama.cpp's draft p_min is
0.75, and on Qwen2.5-Coder 1.5B with the 0.5B 0.4 measured better than 0.6 and 0.8): such a guess is rarely
the target's argmax, and each costs a forward of the draft. Its logits are those of the first DRAFT_VOCAB
tokens only (FR-Spec's frequency-ranked draft head): a BPE vocabulary's ids follow its merges, most frequent
first, the first 32,768 of Qwen2.5's 151,936 tokens are 94% of English and Python text, and the output
matrix is 37% of what Qwen2.5-0.5B reads per token. A rarer token is never guessed; the target still
says it.
"""

from __future__ import annotations

import numpy as np

from ...errors import LlambaError
from ...memory.kv_cache import KVCache
from ...memory.sequence import Sequence
from ..sampling import Sampler
from .speculative import Draft

MIN_CONFIDENCE = 0.4
DRAFT_VOCAB = 32768


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
        self.logits = np.full(n_vocab, -np.inf, np.float32)  # the tokens past DRAFT_VOCAB stay unlikely
        self.n_head = n_vocab  # how many of self.logits the draft computes

    def reset(self) -> None:
        pass  # the cache is reused across generations: only the differing tail is recomputed

    def lag(self, context: list[int], kind=None) -> int:
        """Tokens the draft must evaluate before its first guess after context (besides the last one); kind
        as the drafters that offer several take it."""
        return len(context) - 1 - min(self.sequence.common_prefix(context), len(context) - 1)

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        logits = self._catch_up(context)
        greedy = sampler.params.temperature == 0
        tokens, probs, seen = [], [], list(context)
        for i in range(k):
            ids, p = sampler.distribution(logits, seen)
            if greedy and top_probability(logits[: self.n_head]) < MIN_CONFIDENCE:  # the rest is -inf
                break
            token = int(ids[0]) if greedy else int(ids[sampler.rng.choice(len(ids), p=p)])
            tokens.append(token)
            probs.append((ids, p))
            seen.append(token)
            if i + 1 < k:
                logits = self._forward([token], len(seen) - 1)
                self.sequence.extend([token])
        return Draft(tokens, None if greedy else probs)

    def _catch_up(self, context: list[int]):
        """The draft's logits after context, evaluating only the tokens its cache does not hold."""
        n = min(self.sequence.common_prefix(context), len(context) - 1)  # the last token runs for its logits
        self.sequence.keep(n)
        logits = self._forward(context[n:], n)
        self.sequence.extend(context[n:])
        return logits

    def _forward(self, tokens: list[int], pos: int) -> np.ndarray:
        head = self.model.forward_tokens(tokens, pos, self.cache, vocab=DRAFT_VOCAB)
        self.n_head = len(head)
        self.logits[: self.n_head] = head
        return self.logits


def top_probability(logits: np.ndarray) -> float:
    """The softmax probability of the likeliest token."""
    return 1.0 / float(np.exp(logits - logits.max()).sum())
