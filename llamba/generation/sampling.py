"""Sampling: one schema of options (SamplingParams) and a sampler built from it as a chain of small stages.

    logit bias -> penalties (repeat / frequency / presence over the last N tokens) -> top-k -> typical-p
    -> top-p -> min-p -> temperature -> seeded draw

as llama.cpp's default sampler chain. Temperature 0 is greedy. A stage has `apply` (candidates in, candidates
out) and `accept` (the token drawn, for stages with state of their own), so a grammar mask or another logit
processor is one more stage, not an edit of the sampler. After top-k the candidates are a few dozen sorted
ids with their logits, so the rest of the chain touches a few dozen numbers, not the whole vocabulary.

SamplingParams is the one declaration of the options: the CLI's flags, the server's request fields and the
REPL's /set keys, with their defaults, ranges and help, are all generated from its fields.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from ..errors import BadRequestError


def _option(default, help: str, ge=None, gt=None, le=None, lt=None, flag: str | None = None,
            key: str | None = None, api_bounds: dict | None = None):
    """A field of SamplingParams with what the interfaces need to offer it: help, range (checked by validate),
    the CLI flag and the REPL key when they are not the field's own name, and tighter bounds for the OpenAI
    API where OpenAI sets them (temperature up to 2, penalties in -2..2)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    return field(default=default, metadata=dict(help=help, bounds=bounds, flag=flag, key=key,
                                                 api_bounds={**bounds, **(api_bounds or {})}))


@dataclass
class SamplingParams:
    temperature: float = _option(0.8, "Temperature; 0 is greedy.", ge=0, flag="--temp", key="temp",
                                 api_bounds=dict(le=2))
    top_k: int = _option(40, "Keep the k likeliest tokens (0: off).", ge=0)
    top_p: float = _option(0.95, "Nucleus mass to keep (1: off).", gt=0, le=1)
    min_p: float = _option(0.05, "Drop tokens below min_p x the best.", ge=0, le=1)
    typical_p: float = _option(1.0, "Locally typical mass (1: off).", gt=0, le=1)
    repeat_penalty: float = _option(1.0, "Penalty for repeats (1: off).", gt=0)
    repeat_last_n: int = _option(64, "Window of the penalties (-1: all).", ge=-1)
    frequency_penalty: float = _option(0.0, "Subtract this per earlier occurrence (0: off).",
                                       api_bounds=dict(ge=-2, le=2))
    presence_penalty: float = _option(0.0, "Subtract this once from every earlier token (0: off).",
                                      api_bounds=dict(ge=-2, le=2))
    seed: int | None = _option(None, "Seed for a repeatable draw (-1 or none: random).", ge=-1, lt=2**64)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (the API's)

    def validate(self) -> "SamplingParams":
        """Self, once every value is finite and in its range; else a BadRequestError naming the option."""
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRequestError(f"{name} must be a finite number (got {value})")
        for option in OPTIONS:
            value = getattr(self, option.name)
            if value is not None and not _within(value, option.metadata["bounds"]):
                raise BadRequestError(f"{option.name} must be {describe_range(option.metadata['bounds'])} "
                                      f"(got {value})")
        return self


OPTIONS = [f for f in fields(SamplingParams) if "help" in f.metadata]  # the options users set by name


def option_type(option) -> type:
    """int or float: what a value of this option is parsed as."""
    return int if option.type in (int, "int", "int | None") else float


def describe_range(bounds: dict) -> str:
    """'in (0, 1]', '>= 0', ...: a range as the error messages and help say it."""
    low = [(f"{'(' if k == 'gt' else '['}{v}") for k, v in bounds.items() if k in ("ge", "gt")]
    high = [(f"{v}{')' if k == 'lt' else ']'}") for k, v in bounds.items() if k in ("le", "lt")]
    if low and high:
        return f"in {low[0]}, {high[0]}"
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{symbols[k]} {v}" for k, v in bounds.items()) or "a number"


def _within(value, bounds: dict) -> bool:
    return all(getattr(operator, k)(value, v) for k, v in bounds.items())


# ----------------------------------------------------------------------------------------- the chain

@dataclass
class Candidates:
    """The tokens still in the running: ids (None: the whole vocabulary, in id order) and their logits."""

    ids: np.ndarray | None
    logits: np.ndarray


class Stage(Protocol):
    def apply(self, c: Candidates, history: list[int]) -> Candidates: ...

    def accept(self, token: int) -> None: ...


class _Stateless:
    def accept(self, token: int) -> None:
        pass


@dataclass
class LogitBias(_Stateless):
    bias: dict[int, float]

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        logits = c.logits.copy()
        for token, bias in self.bias.items():
            if 0 <= int(token) < len(logits):
                logits[int(token)] += bias
        return Candidates(c.ids, logits)


@dataclass
class Penalties(_Stateless):
    """llama.cpp's repeat, frequency and presence penalties over the last `last_n` tokens of the history."""

    repeat: float
    frequency: float
    presence: float
    last_n: int

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        if not history:
            return c
        window = history if self.last_n == -1 else history[-self.last_n :] if self.last_n else []
        tokens, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        if not len(tokens):
            return c
        logits = c.logits.copy()
        seen = logits[tokens]
        # llama.cpp: divide positive logits by the penalty, multiply negative ones
        seen = np.where(seen > 0, seen / self.repeat, seen * self.repeat)
        seen -= counts * self.frequency + self.presence
        logits[tokens] = seen
        return Candidates(c.ids, logits)


class Greedy(_Stateless):
    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        return Candidates(np.array([int(np.argmax(c.logits))]), c.logits[[int(np.argmax(c.logits))]])


@dataclass
class TopK(_Stateless):
    """The k best candidates, sorted by logit (all of them, sorted, when k is 0): the stages after it rely on
    the order, so the chain always has it."""

    k: int

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        logits = c.logits
        if 0 < self.k < len(logits):
            ids = np.argpartition(-logits, self.k - 1)[: self.k]
        else:
            ids = np.arange(len(logits))
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        return Candidates(ids, logits[ids])


@dataclass
class Typical(_Stateless):
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass p."""

    p: float

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        probs = _softmax(c.logits)
        logp = np.log(np.maximum(probs, 1e-30))
        entropy = -(probs * logp).sum()
        order = np.argsort(np.abs(-logp - entropy), kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), self.p) + 1)
        chosen = np.sort(order[:keep])  # back in logit order
        return Candidates(c.ids[chosen], c.logits[chosen])


@dataclass
class TopP(_Stateless):
    p: float

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        keep = int(np.searchsorted(np.cumsum(_softmax(c.logits)), self.p) + 1)  # the smallest prefix reaching p
        return Candidates(c.ids[:keep], c.logits[:keep])


@dataclass
class MinP(_Stateless):
    p: float

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        keep = c.logits >= c.logits.max() + math.log(self.p)  # p_i >= min_p * p_max, in logit space
        return Candidates(c.ids[keep], c.logits[keep])


def build_chain(p: SamplingParams) -> list[Stage]:
    """The stages these options switch on, in llama.cpp's order (temperature is applied by the draw)."""
    chain: list[Stage] = []
    if p.logit_bias:
        chain.append(LogitBias(p.logit_bias))
    if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        chain.append(Penalties(p.repeat_penalty, p.frequency_penalty, p.presence_penalty, p.repeat_last_n))
    if p.temperature == 0:
        return chain + [Greedy()]
    chain.append(TopK(p.top_k))
    if p.typical_p < 1.0:
        chain.append(Typical(p.typical_p))
    if p.top_p < 1.0:
        chain.append(TopP(p.top_p))
    if p.min_p > 0.0:
        chain.append(MinP(p.min_p))
    return chain


class Sampler:
    """Picks the next token from logits through its chain; `distribution` exposes the final candidates and
    probabilities (the decoders' speculative sampling needs them). `constraint`: a stage that runs first and
    masks what a grammar forbids (generation/constraints.py's GrammarMask)."""

    def __init__(self, params: SamplingParams | None = None, constraint: Stage | None = None, **overrides):
        params = params or SamplingParams()
        for key, value in overrides.items():
            if not hasattr(params, key):
                raise BadRequestError(f"unknown sampling option {key!r}")
            setattr(params, key, value)
        self.params = params.validate()
        self.constraint = constraint
        self.chain = ([constraint] if constraint is not None else []) + build_chain(params)
        self.rng = np.random.default_rng(None if params.seed == -1 else params.seed)

    def sample(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        ids, probs = self.distribution(logits, history)
        token = int(ids[0]) if len(ids) == 1 else int(ids[self.rng.choice(len(ids), p=probs)])
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Tell every stage which token was chosen (a grammar advances its state)."""
        for stage in self.chain:
            stage.accept(token)

    def distribution(self, logits: np.ndarray, history: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities) after every stage but the draw; greedy gives one candidate."""
        c = Candidates(None, np.asarray(logits, dtype=np.float32))
        for stage in self.chain:
            c = stage.apply(c, history or [])
        if self.params.temperature == 0:
            return c.ids, np.ones(1)
        return c.ids, _softmax(c.logits / self.params.temperature)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ----------------------------------------------------------------------------------------- names the interfaces use

def cli_flag(option) -> str:
    """The command line's flag for an option (llama.cpp's: --temp, --top-k, ...)."""
    return option.metadata["flag"] or "--" + option.name.replace("_", "-")


def repl_key(option) -> str:
    """The REPL's /set key for an option (the short name where llama.cpp's REPL has one: temp)."""
    return option.metadata["key"] or option.name
