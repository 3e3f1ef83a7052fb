"""Samplers: a chain of small stages in llama.cpp's default order, each switchable.

    logit bias -> penalties (repeat / frequency / presence over the last N tokens) -> top-k -> typical-p
    -> top-p -> min-p -> temperature -> seeded draw

Temperature 0 is greedy. Every stage works on a candidate set (token ids with their logits), so after top-k
the rest of the chain touches a few dozen numbers, not the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadRequestError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature})"),
            (self.top_k >= 0, f"top_k must be >= 0, 0 disables it (got {self.top_k})"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (0 < self.typical_p <= 1, f"typical_p must be in (0, 1] (got {self.typical_p})"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (got {self.repeat_penalty})"),
            (self.repeat_last_n >= -1, f"repeat_last_n must be >= -1 (got {self.repeat_last_n})"),
            (self.seed is None or -1 <= self.seed < 2**64, f"seed must be -1 (random) or in 0..2^64-1 (got {self.seed})"),
        ]
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRequestError(f"{name} must be a finite number (got {value})")
        for ok, message in checks:
            if not ok:
                raise BadRequestError(message)
        return self


class Sampler:
    """Picks the next token from logits; `distribution` exposes the final candidates and probabilities."""

    def __init__(self, params: SamplingParams | None = None, **overrides):
        params = params or SamplingParams()
        for key, value in overrides.items():
            if not hasattr(params, key):
                raise BadRequestError(f"unknown sampling option {key!r}")
            setattr(params, key, value)
        self.params = params.validate()
        self.rng = np.random.default_rng(None if params.seed == -1 else params.seed)

    def sample(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        ids, probs = self.distribution(logits, history)
        if len(ids) == 1:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def distribution(self, logits: np.ndarray, history: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities) after every stage but the draw; greedy gives one candidate."""
        p = self.params
        logits = self._penalized(np.asarray(logits, dtype=np.float32), history or [])
        if p.temperature == 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)
        ids, vals = _top_k(logits, p.top_k)
        ids, vals = _typical(ids, vals, p.typical_p)
        ids, vals = _top_p(ids, vals, p.top_p)
        ids, vals = _min_p(ids, vals, p.min_p)
        return ids, _softmax(vals / p.temperature)

    def _penalized(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.params
        needs_penalty = p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        if not p.logit_bias and not (needs_penalty and history):
            return logits
        logits = logits.copy()
        for token, bias in p.logit_bias.items():
            if 0 <= int(token) < len(logits):
                logits[int(token)] += bias
        if needs_penalty and history:
            window = history if p.repeat_last_n == -1 else history[-p.repeat_last_n :] if p.repeat_last_n else []
            tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
            if len(tokens):
                seen = logits[tokens]
                # llama.cpp: divide positive logits by the penalty, multiply negative ones
                seen = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
                seen -= counts * p.frequency_penalty + p.presence_penalty
                logits[tokens] = seen
        return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates, sorted by logit (all of them, sorted, when k is 0)."""
    if 0 < k < len(logits):
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(len(logits))
    order = np.argsort(-logits[ids], kind="stable")
    ids = ids[order]
    return ids, logits[ids]


def _top_p(ids, vals, top_p: float):
    if top_p >= 1.0:
        return ids, vals
    cumulative = np.cumsum(_softmax(vals))
    keep = int(np.searchsorted(cumulative, top_p) + 1)  # the smallest prefix whose mass reaches top_p
    return ids[:keep], vals[:keep]


def _min_p(ids, vals, min_p: float):
    if min_p <= 0.0:
        return ids, vals
    keep = vals >= vals.max() + math.log(min_p)  # p_i >= min_p * p_max, in logit space
    return ids[keep], vals[keep]


def _typical(ids, vals, typical_p: float):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass p."""
    if typical_p >= 1.0:
        return ids, vals
    probs = _softmax(vals)
    logp = np.log(np.maximum(probs, 1e-30))
    entropy = -(probs * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, typical_p) + 1)
    chosen = np.sort(order[:keep])  # back in logit order
    return ids[chosen], vals[chosen]
