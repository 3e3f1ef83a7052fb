"""Guess ahead, check in one batch: the token loop every decoder shares.

Each step samples the next token, asks a drafter for guesses that might follow it, and evaluates the token and
its guesses as one batch (one read of the weights for all of them). Guesses are accepted left to right by
speculative sampling, so the output follows exactly the target model's distribution (with the samplers'
truncations); at temperature 0 a guess is accepted only when it is the argmax, and because the batch kernels
are batch-invariant the output is token for token that of plain greedy decoding. Rejected guesses leave the
cache. With no drafter, or no guesses, a step is plain decoding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from ...memory.batch import Batch
from ..sampling import Sampler


@dataclass
class Draft:
    """Guesses for what follows the token being evaluated (the root), as a tree.

    tokens[i] continues parents[i] (-1: the root; else an earlier index), so one guessed line is a chain and
    several candidate lines share their common start. The first n_guesses nodes are guesses to verify; any
    after them are rows the drafter wants evaluated for itself (lookahead's Jacobi window), never accepted.
    probs[i] = (ids, probabilities) of the distribution guess i was drawn from (a chain), or None for guesses
    that were not drawn (copied from earlier text, greedy drafts, a pool of n-grams).
    """

    tokens: list[int]
    probs: list[tuple[np.ndarray, np.ndarray]] | None = None
    parents: list[int] | None = None  # None: a chain
    n_guesses: int | None = None  # None: every node is a guess
    kind: object = None  # the drafter's kind of guess (Drafter.kind), for the controller's statistics

    def __post_init__(self):
        if self.parents is None:
            self.parents = list(range(-1, len(self.tokens) - 1))
        if self.n_guesses is None:
            self.n_guesses = len(self.tokens)

    def batch(self, root: int, pos: int, seq: int = 0) -> Batch:
        """The root at pos and every node after it, as one batch wanting every row's logits."""
        parents = np.array([-1] + [p + 1 if p >= 0 else 0 for p in self.parents], np.int64)
        positions = np.empty(len(parents), np.int64)
        positions[0] = pos
        for i in range(1, len(parents)):
            positions[i] = positions[parents[i]] + 1
        n = len(parents)
        return Batch(np.array([root] + self.tokens, np.int64), positions, np.full(n, seq, np.int64), parents,
                     np.ones(n, bool))


class Drafter(Protocol):
    name: str

    def propose(self, context: list[int], k: int, sampler: Sampler) -> Draft:
        """At most k guesses for what follows context (context ends with the token being evaluated)."""

    def reset(self) -> None:
        """A new generation starts (forget per-generation state; a pool of seen text may stay)."""

    # Optional: `extra_rows` (int), rows of its own the drafter adds to every guessing step;
    # `kinds(context)`, the kinds of guess it could make next (auto: a copy and the draft model's), of which the
    # controller picks one and `propose(context, k, sampler, kind)` makes it;
    # `observe(draft, rows)`, called with the logits of every row after the step's forward (lookahead has both);
    # `kind(context)`, what sort of guess would come next (prompt lookup: how long a match), None for none at
    # all: the controller keeps an acceptance rate per kind, since a long match is far likelier to hold.


@dataclass
class SpeculationStats:
    steps: int = 0  # forward passes while generating
    proposed: int = 0  # guesses evaluated
    accepted: int = 0  # guesses that became output

    @property
    def tokens_per_step(self) -> float:
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0


STEADY_LAG = 2  # tokens a draft model evaluates before guessing in steady use: the target's next token, and
#                the last guess when all were accepted


class Controller:
    """Chooses how many guesses to check per step, from what this machine and model measure.

    It keeps the recent acceptance rate a of single guesses, per kind of guess where the drafter tells kinds
    apart, and the cost of a forward pass per batch size (seconds, moving averages). k guesses return on
    average 1 + a + ... + a^k tokens and cost a forward of k + 1 tokens plus drafting; it picks the k with
    the most tokens per second, 0 included. When it settles on 0 it still tries one guess now and then, so a
    text that becomes predictable is noticed.
    """

    PROBE_EVERY = 8
    PROBE_BUDGET = 0.05
    FIRST_RATE = 0.6  # a kind's acceptance rate before any of its guesses was checked

    def __init__(self, max_k: int = 8, fixed_k: int | None = None):
        self.max_k = max_k
        self.fixed_k = fixed_k
        self.accept_rates: dict = {}  # kind of guess -> acceptance rate
        self.forward_cost: dict[int, float] = {}
        self.draft_costs: dict = {}  # kind of guess -> seconds per proposed guess (copying costs ~0, a model more)
        self._since_probe = 0

    def accept_rate(self, kind=None) -> float:
        return self.accept_rates.get(kind, self.FIRST_RATE)

    def choose(self, available: int, extra_rows: int = 0, kind=None) -> int:
        """How many guesses (of this kind) to check next (0: a plain step); extra_rows: rows the drafter
        adds to any step that guesses (lookahead's window)."""
        limit = min(self.max_k, available)
        if self.fixed_k is not None:
            return min(self.fixed_k, limit)
        best_k, _ = self.plan(available, extra_rows, kind)
        if best_k == 0 and limit > 0 and 1 in self.forward_cost:
            self._since_probe += 1
            if self._since_probe >= self._probe_interval(extra_rows, self.draft_costs.get(kind, 0.0)):
                self._since_probe = 0
                return 1
        return best_k

    def plan(self, available: int, extra_rows: int = 0, kind=None) -> tuple[int, float]:
        """The number of guesses of this kind with the most expected tokens per second, and that rate."""
        if 1 not in self.forward_cost:  # first a plain step: every choice is measured against its cost
            return 0, 0.0
        best_k, best_rate = 0, 1.0 / self._cost(1)
        a, draft_cost = self.accept_rate(kind), self.draft_costs.get(kind, 0.0)
        for k in range(1, min(self.max_k, available) + 1):
            expected = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1.0
            rate = expected / (self._cost(k + 1 + extra_rows) + k * draft_cost)
            if rate > best_rate * 1.02:  # a guess must pay for itself clearly
                best_k, best_rate = k, rate
        return best_k, best_rate

    def best_kind(self, kinds: list, available: int, extra_rows: int = 0):
        """Of several kinds of guess on offer, the one expected to give the most tokens per second."""
        return max(kinds, key=lambda kind: self.plan(available, extra_rows, kind)[1])

    def _probe_interval(self, extra_rows: int, draft_cost: float) -> int:
        """Plain steps between probes: a probe may cost several plain steps (lookahead's window, a draft
        catching up), so it comes rarely enough to cost at most PROBE_BUDGET of the time."""
        probe = self._cost(2 + extra_rows) + draft_cost
        return max(self.PROBE_EVERY, math.ceil((probe / self._cost(1) - 1) / self.PROBE_BUDGET))

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
        _moving_average(self.forward_cost, n, seconds)

    def record_draft(self, proposed: int, seconds: float, kind=None) -> None:
        if proposed:
            _moving_average(self.draft_costs, kind, seconds / proposed)

    def record_guesses(self, proposed: int, accepted: int, kind=None) -> None:
        if proposed:
            # acceptance of a guess given its predecessors were accepted: accepted of the ones checked
            checked = min(proposed, accepted + 1)
            rate = accepted / checked
            self.accept_rates[kind] = min(0.98, max(0.02, 0.85 * self.accept_rate(kind) + 0.15 * rate))


def _moving_average(table: dict, key, value: float) -> None:
    """table[key] follows value with weight 0.2 (the first value as it is): recent costs count most."""
    old = table.get(key)
    table[key] = value if old is None else 0.8 * old + 0.2 * value


@dataclass
class Speculation:
    """A drafter with its controller: what a decoder name (`--decoding`) turns into."""

    drafter: Drafter | None
    controller: Controller = field(default_factory=Controller)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    fresh: bool = True  # the next guess is a generation's first (its drafter may prepare: not timed)

    def start(self) -> None:
        """A new generation begins: its own statistics (what the controller learned stays)."""
        self.stats = SpeculationStats()
        if self.drafter is not None:
            self.drafter.reset()
        self.fresh = True


def decode_tokens(model, cache, logits: np.ndarray, pos: int, history: list[int], sampler: Sampler,
                  speculation: Speculation | None, max_new: int) -> Iterator[int]:
    """Yield up to max_new tokens sampled after `logits` (those of position pos - 1). history holds every token
    so far and grows as tokens are yielded. The caller may stop at any token; the cache then holds at most
    the tokens yielded so far (possibly fewer: the last one yielded is never evaluated)."""
    spec = speculation or Speculation(None)
    spec.start()
    token = sampler.sample(logits, history)
    history.append(token)
    produced = 1
    yield token
    while produced < max_new and pos < cache.n_ctx:
        room = min(max_new - produced - 1, cache.n_ctx - 1 - pos)
        draft = guess(spec, history, room, sampler)
        t0 = time.perf_counter()
        rows = model.forward(draft.batch(token, pos), cache)
        verdict = settle(spec, cache, cache.last_cells, draft, rows, sampler, history, time.perf_counter() - t0)
        pos += 1 + len(verdict.accepted)
        for t in verdict.accepted + [verdict.following]:
            history.append(t)
            produced += 1
            yield t
        token = verdict.following


def guess(spec: Speculation, history: list[int], room: int, sampler: Sampler) -> Draft:
    """The drafter's guesses after history (whose last token is being evaluated), as many as the controller
    thinks pay for themselves within room; none for plain decoding."""
    drafter = spec.drafter
    if drafter is None or room <= 0:
        return Draft([])
    extra_rows = getattr(drafter, "extra_rows", 0)
    if hasattr(drafter, "kinds"):  # several guessers on offer: the controller picks the kind that pays best
        kinds = drafter.kinds(history)
        kind = spec.controller.best_kind(kinds, room, extra_rows) if kinds else None
    else:
        kind = drafter.kind(history) if hasattr(drafter, "kind") else "any"
    if kind is None:  # nothing to guess from: a plain step (and no probe counted)
        return Draft([])
    k = spec.controller.choose(room, extra_rows, kind)
    if not k:
        return Draft([])
    lag = drafter.lag(history, kind) if hasattr(drafter, "lag") else 0
    t0 = time.perf_counter()
    draft = drafter.propose(history, k, sampler, kind) if hasattr(drafter, "kinds") else drafter.propose(history, k, sampler)
    draft.kind = kind
    # A drafter that first had to read many tokens (a generation's prompt, or the tokens copied while the
    # controller took another kind) did a one-off catch-up: charged to these guesses, it would make the kind
    # look too dear to try again for the rest of the session.
    if not spec.fresh and lag <= STEADY_LAG:
        spec.controller.record_draft(max(draft.n_guesses, 1), time.perf_counter() - t0, kind)  # none: it still looked
    spec.fresh = False
    return draft


@dataclass
class Verdict:
    accepted: list[int]  # guesses that became output
    following: int  # the token sampled after them (evaluated by the next step)
    kept: list[int]  # batch rows whose cells stay: the root and the accepted guesses


def settle(spec: Speculation, cache, cells: np.ndarray, draft: Draft, rows: np.ndarray, sampler: Sampler,
           history: list[int], seconds: float) -> Verdict:
    """After the forward of draft.batch(...), which went to these cells: verify the guesses, free the cells
    of every other row, let the drafter see its rows, and keep the statistics."""
    verdict = verify_guesses(rows, draft, sampler, history)
    dropped = np.setdiff1d(np.arange(len(rows)), verdict.kept)
    if len(dropped):
        cache.remove_cells(cells[dropped])
    if spec.drafter is not None and hasattr(spec.drafter, "observe"):
        spec.drafter.observe(draft, rows)
    spec.controller.record_forward(len(rows), seconds)
    spec.controller.record_guesses(draft.n_guesses, len(verdict.accepted), draft.kind)
    spec.stats.steps += 1
    spec.stats.proposed += draft.n_guesses
    spec.stats.accepted += len(verdict.accepted)
    return verdict


def verify_guesses(rows: np.ndarray, draft: Draft, sampler: Sampler, history: list[int]) -> Verdict:
    """Walk the tree of guesses from the root (row 0): sample each row's token from the target's distribution
    and follow the child guess that matches it. Drawn guesses (a chain with probs) are accepted by speculative
    sampling instead. Either way the tokens are distributed exactly as plain sampling from the target."""
    accepted, kept, context = [], [0], list(history)
    node = -1
    while True:
        row = rows[node + 1]
        children = [i for i in range(draft.n_guesses) if draft.parents[i] == node]
        if draft.probs is not None and children:
            child = children[0]
            ids, p = sampler.distribution(row, context)
            ok, token = _accept(ids, p, draft.tokens[child], draft.probs[child], sampler.rng)
            sampler.accept(token)  # as sample() does: stages with state (a grammar) follow the output
            if not ok:
                return Verdict(accepted, token, kept)
        else:
            token = sampler.sample(row, context)
            child = next((i for i in children if draft.tokens[i] == token), None)
            if child is None:
                return Verdict(accepted, token, kept)
        accepted.append(token)
        kept.append(child + 1)
        context.append(token)
        node = child


def _accept(ids: np.ndarray, p: np.ndarray, guess: int, q: tuple[np.ndarray, np.ndarray], rng) -> tuple[bool, int]:
    """Accept a guess drawn from q with probability min(1, p/q); on rejection, draw from the residual
    max(0, p - q), normalized. The result is distributed exactly as p."""
    if len(ids) == 1:  # greedy: the argmax or nothing
        return int(ids[0]) == guess, int(ids[0])
    p_guess = float(p[ids == guess].sum())
    q_guess = float(q[1][q[0] == guess].sum())
    if q_guess > 0 and rng.random() < min(1.0, p_guess / q_guess):
        return True, guess
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
