"""Guess ahead, check in one batch: the token loop every decoder shares.

Each step samples the next token, asks a drafter for guesses that might follow it, and evaluates the token and
its guesses as one batch (one read of the weights for all of them). Guesses are accepted left to right by
speculative sampling, so the output follows exactly the target model's distribution (with the samplers'
truncations); at temperature 0 a guess is accepted only when it is the argmax, and because the batch kernels
are batch-invariant the output is token for token that of plain greedy decoding. Rejected guesses leave the
cache. With no drafter, or no guesses, a step is plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from ..batch import Batch
from ..sampling import Sampler


@dataclass
class Draft:
    """A line of guesses; probs[i] = (ids, probabilities) of the distribution guess i was drawn from, or None
    for guesses that were not drawn (copied from earlier text, or a greedy draft)."""

    tokens: list[int]
    probs: list[tuple[np.ndarray, np.ndarray]] | None = None


class Drafter(Protocol):
    name: str

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        """Up to k guesses for what follows context (context ends with the token being evaluated)."""

    def reset(self) -> None:
        """A new generation starts (forget per-generation state; a pool of seen text may stay)."""


@dataclass
class SpeculationStats:
    steps: int = 0  # forward passes while generating
    proposed: int = 0  # guesses evaluated
    accepted: int = 0  # guesses that became output

    @property
    def tokens_per_step(self) -> float:
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0


class Controller:
    """Chooses how many guesses to check per step, from what this machine and model measure.

    It keeps the recent acceptance rate a of single guesses and the cost of a forward pass per batch size
    (seconds, moving averages). k guesses return on average 1 + a + ... + a^k tokens and cost a forward of
    k + 1 tokens plus drafting; it picks the k with the most tokens per second, 0 included. When it settles
    on 0 it still tries one guess now and then, so a text that becomes predictable is noticed.
    """

    PROBE_EVERY = 8

    def __init__(self, max_k: int = 8, fixed_k: int | None = None):
        self.max_k = max_k
        self.fixed_k = fixed_k
        self.accept_rate = 0.6
        self.forward_cost: dict[int, float] = {}
        self.draft_cost = 0.0  # seconds per proposed guess
        self._since_probe = 0

    def choose(self, available: int) -> int:
        limit = min(self.max_k, available)
        if self.fixed_k is not None:
            return min(self.fixed_k, limit)
        best_k, best_rate = 0, 1.0 / self._cost(1)
        for k in range(1, limit + 1):
            a = self.accept_rate
            expected = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0
            rate = expected / (self._cost(k + 1) + k * self.draft_cost)
            if rate > best_rate * 1.02:  # a guess must pay for itself clearly
                best_k, best_rate = k, rate
        if best_k == 0 and limit > 0:
            self._since_probe += 1
            if self._since_probe >= self.PROBE_EVERY:
                self._since_probe = 0
                return 1
        return best_k

    def _cost(self, n: int) -> float:
        if n in self.forward_cost:
            return self.forward_cost[n]
        one = self.forward_cost.get(1, 1.0)
        # until measured: a batch of n reads the weights once, and each extra token adds a little compute
        known = {m: c for m, c in self.forward_cost.items() if m > 1}
        if known:
            m = min(known, key=lambda m: abs(m - n))
            per_token = max(0.0, (known[m] - one) / (m - 1))
            return one + per_token * (n - 1)
        return one * (1 + 0.25 * (n - 1))

    def record_forward(self, n: int, seconds: float) -> None:
        old = self.forward_cost.get(n)
        self.forward_cost[n] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def record_guesses(self, proposed: int, accepted: int, seconds: float) -> None:
        if proposed:
            # acceptance of a guess given its predecessors were accepted: accepted of the ones checked
            checked = min(proposed, accepted + 1)
            rate = accepted / checked
            self.accept_rate = min(0.98, max(0.02, 0.85 * self.accept_rate + 0.15 * rate))
            self.draft_cost = 0.8 * self.draft_cost + 0.2 * seconds / proposed


@dataclass
class Speculation:
    """A drafter with its controller: what a decoder name (`--decoding`) turns into."""

    drafter: Drafter | None
    controller: Controller = field(default_factory=Controller)
    stats: SpeculationStats = field(default_factory=SpeculationStats)


def decode_tokens(model, cache, logits: np.ndarray, pos: int, history: list[int], sampler: Sampler,
                  speculation: Speculation | None, max_new: int) -> Iterator[int]:
    """Yield up to max_new tokens sampled after `logits` (those of position pos - 1). history holds every token
    so far and grows as tokens are yielded. The caller may stop at any token; the cache then holds at most
    the tokens yielded so far (possibly fewer: the last one yielded is never evaluated)."""
    spec = speculation or Speculation(None)
    drafter = spec.drafter
    if drafter is not None:
        drafter.reset()
    token = sampler.sample(logits, history)
    history.append(token)
    produced = 1
    yield token
    while produced < max_new and pos < cache.n_ctx:
        room = min(max_new - produced - 1, cache.n_ctx - 1 - pos)
        k = spec.controller.choose(room) if drafter is not None and room > 0 else 0
        draft, drafted = Draft([]), 0.0
        if k:
            t0 = time.perf_counter()
            draft = drafter.propose(history, k, sampler)
            draft.tokens = draft.tokens[:k]
            drafted = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = model.forward(Batch.chain([token] + draft.tokens, pos, logits="all"), cache)
        spec.controller.record_forward(1 + len(draft.tokens), time.perf_counter() - t0)
        accepted, token = verify_guesses(rows, draft, sampler, history)
        spec.controller.record_guesses(len(draft.tokens), len(accepted), drafted)
        spec.stats.steps += 1
        spec.stats.proposed += len(draft.tokens)
        spec.stats.accepted += len(accepted)
        pos += 1 + len(accepted)
        if len(accepted) < len(draft.tokens):
            cache.remove(0, pos)  # the rejected guesses
        for t in accepted + [token]:
            history.append(t)
            produced += 1
            yield t


def verify_guesses(rows: np.ndarray, draft: Draft, sampler: Sampler, history: list[int]) -> tuple[list[int], int]:
    """(accepted guesses, the next token): speculative sampling over the batch's logits rows."""
    accepted: list[int] = []
    context = list(history)
    for i, guess in enumerate(draft.tokens):
        ids, p = sampler.distribution(rows[i], context)
        q = draft.probs[i] if draft.probs is not None else None
        ok, replacement = _accept(ids, p, guess, q, sampler.rng)
        if not ok:
            return accepted, replacement
        accepted.append(guess)
        context.append(guess)
    return accepted, sampler.sample(rows[len(draft.tokens)], context)


def _accept(ids: np.ndarray, p: np.ndarray, guess: int, q, rng) -> tuple[bool, int]:
    """Accept guess with probability min(1, p/q) (q = 1 for a guess that was not drawn); on rejection, draw
    from the residual max(0, p - q), normalized. The result is distributed exactly as p."""
    if len(ids) == 1:  # greedy: the argmax or nothing
        return int(ids[0]) == guess, int(ids[0])
    p_guess = float(p[ids == guess].sum())
    q_guess = 1.0 if q is None else float(q[1][q[0] == guess].sum())
    if q_guess > 0 and rng.random() < min(1.0, p_guess / q_guess):
        return True, guess
    residual = p.copy()
    if q is None:
        residual[ids == guess] = 0.0
    else:
        q_on_ids = np.zeros_like(p)
        where = {int(t): j for j, t in enumerate(ids)}
        for t, prob in zip(q[0], q[1]):
            if int(t) in where:
                q_on_ids[where[int(t)]] = prob
        residual = np.maximum(0.0, p - q_on_ids)
    total = residual.sum()
    if total <= 0:  # p and q agree where p lives: any draw from p is right
        residual, total = p, p.sum()
    return False, int(ids[rng.choice(len(ids), p=residual / total)])
