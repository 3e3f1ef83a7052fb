"""Self-speculative decoding: the model with some of its layers left out is its own draft.

Which layers to leave out is measured on the running model, at the first guess, over the text at hand: each
layer is left out alone and scored by how often the model's next-token choice (teacher-forced over the last
CALIBRATION tokens) survives; then the least harmful layers are left out together in a few amounts, and the
amount with the best expected speed wins (agreement a, draft cost c of a forward per guess, verification
cost from the batch kernels). The draft runs as a draft model would (its own cache, drawn guesses at
temperature > 0), so the output stays exactly the target's.
"""

from __future__ import annotations

import numpy as np

from ...memory.kv_cache import KVCache
from .draft_model import DraftModel

CALIBRATION = 64  # tokens the choice is measured on
FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8)  # how much of the model may be left out
VERIFY_PER_TOKEN = 0.15  # a guess's share of a forward when checked in a batch (benchmarks/speculative.py)


class LayerSkipping:
    """The model with layers `skip` left out, as a draft model (forward_tokens, hp)."""

    def __init__(self, model, skip: frozenset[int] = frozenset()):
        self.model, self.hp, self.skip = model, model.hp, skip
        self.key_stats = model.key_stats  # its cache quantizes keys as the whole model's does

    def forward_tokens(self, tokens, start_pos: int, cache, **kwargs) -> np.ndarray:
        return self.model.forward_tokens(tokens, start_pos, cache, skip=self.skip, **kwargs)


class SelfSpeculation(DraftModel):
    def __init__(self, model, n_ctx: int, kv_type: str = "f32"):
        super().__init__(LayerSkipping(model), n_ctx, model.hp.n_vocab, kv_type, label="self")
        self.name = "self-spec"
        self.calibrated = False

    def propose(self, context: list[int], k: int, sampler):
        if not self.calibrated:
            self.model.skip = choose_skipped_layers(self.model.model, context)
            self.sequence.forget()  # whatever the draft cache held came from other layers
            self.calibrated = True
        return super().propose(context, k, sampler)


def choose_skipped_layers(model, tokens: list[int]) -> frozenset[int]:
    """The set of layers to leave out that promises the most tokens per second (see the module's doc)."""
    tokens = list(tokens[-CALIBRATION:])
    n_layer = model.hp.n_layer
    if len(tokens) < 2 or n_layer < 2:
        return frozenset()
    cache = KVCache.for_model(model.hp, len(tokens))

    def choices(skip: frozenset[int]) -> np.ndarray:  # forward_tokens from 0 replaces what the cache held
        return np.argmax(model.forward_tokens(tokens, 0, cache, all_logits=True, skip=skip), axis=1)

    reference = choices(frozenset())

    def agreement(skip: frozenset[int]) -> float:
        return float(np.mean(choices(skip) == reference))

    alone = {i: agreement(frozenset([i])) for i in range(n_layer)}
    order = sorted(range(n_layer), key=lambda i: (-alone[i], i))
    best, best_speed = frozenset(), 0.0
    for m in sorted({max(1, round(f * n_layer)) for f in FRACTIONS}):
        skip = frozenset(order[:m])
        speed = expected_speed(agreement(skip), (n_layer - m) / n_layer)
        if speed > best_speed:
            best, best_speed = skip, speed
    return best


def expected_speed(accept: float, draft_cost: float, max_k: int = 6) -> float:
    """Tokens per forward's worth of time at the best number of guesses k (1 for plain decoding)."""
    best = 1.0
    for k in range(1, max_k + 1):
        tokens = (1 - accept ** (k + 1)) / (1 - accept) if accept < 1 else k + 1.0
        best = max(best, tokens / (1 + VERIFY_PER_TOKEN * k + draft_cost * k))
    return best
