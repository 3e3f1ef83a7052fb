"""The generation loop: a generator of tokens and text pieces, with stop conditions and timing.

`generate_steps` evaluates the prompt (from `start_pos`, so a cache that already holds a prefix is reused),
then samples one token at a time, handing each to the caller's text sink (text/stream.py's TextStream:
detokenizing, stop strings, held-back tails, finish reasons, the one the server uses too), which also says
when the text has ended.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from ..errors import ContextOverflowError
from .decoding import Speculation, decode_tokens
from .sampling import Sampler


class TextSink(Protocol):
    """What the loop hands its tokens to (text/stream.py's TextStream): text out, and whether it has ended."""

    finish_reason: str | None

    def push(self, token: int) -> str: ...

    def finish(self, reason: str) -> str: ...


@dataclass
class Step:
    """One generated token and the text it completes (possibly '' while a character or stop is pending).
    A final Step with token -1 carries text held back until the end (a partial character or stop string)."""

    token: int
    text: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    evaluated_prompt_tokens: int = 0  # prompt tokens actually run (the rest came from the cache)
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    finish_reason: str = ""  # stop | length | context | interrupted
    speculation: object = None  # SpeculationStats of a decoder that guessed ahead, else None

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per forward pass (1 for plain decoding)."""
        return self.speculation.tokens_per_step if self.speculation is not None and self.speculation.steps else 1.0

    @property
    def time_to_first_token(self) -> float:
        return self.prompt_seconds

    @property
    def prompt_tok_per_s(self) -> float:
        return self.evaluated_prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tok_per_s(self) -> float:
        # the first token comes with the prompt; the rate counts the ones after it
        n = self.generated_tokens - 1
        return n / self.generate_seconds if n > 0 and self.generate_seconds else 0.0


def generate_steps(model, text: TextSink, cache, prompt_ids: list[int], sampler: Sampler, max_tokens: int,
                   start_pos: int = 0, stats: GenerationStats | None = None, history: list[int] | None = None,
                   speculation: Speculation | None = None) -> Iterator[Step]:
    """Yield Steps until the text ends (an end-of-generation token, a stop string), max_tokens, or a full context.

    `text` turns the tokens into text (text/stream.py's TextStream). prompt_ids[:start_pos] must already be
    in the cache. `stats` (if given) is filled in as it goes.
    `speculation` (a decoder that guesses ahead) changes how fast tokens come, never which: see decoding/.
    """
    stats = stats if stats is not None else GenerationStats()
    if len(prompt_ids) > cache.n_ctx:
        raise ContextOverflowError(f"prompt of {len(prompt_ids)} tokens is longer than the context ({cache.n_ctx})")
    if start_pos >= len(prompt_ids):
        start_pos = len(prompt_ids) - 1  # re-run the last token: its logits are needed
    stats.prompt_tokens = len(prompt_ids)
    stats.evaluated_prompt_tokens = len(prompt_ids) - start_pos
    t0 = time.perf_counter()
    logits = model.forward_tokens(prompt_ids[start_pos:], start_pos, cache)
    if max_tokens == 0:  # the prompt is evaluated (and cached), nothing generated
        stats.prompt_seconds = time.perf_counter() - t0
        stats.finish_reason = "length"
        return
    history = list(history if history is not None else prompt_ids)
    tokens = decode_tokens(model, cache, logits, len(prompt_ids), history, sampler, speculation, max_tokens)
    stats.finish_reason = ""
    try:
        for token in tokens:
            if stats.generated_tokens == 0:
                stats.prompt_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                # the token loop has started the speculation: this generation's statistics
                stats.speculation = speculation.stats if speculation is not None else None
            stats.generated_tokens += 1
            yield Step(token, text.push(token))
            if text.finish_reason:
                break
            stats.generate_seconds = time.perf_counter() - t0
    finally:
        tokens.close()
    if not text.finish_reason:  # the tokens ran out: the budget, or the context
        tail = text.finish("length" if stats.generated_tokens >= max_tokens else "context")
        if tail:
            yield Step(-1, tail)
    stats.finish_reason = text.finish_reason
    stats.generate_seconds = time.perf_counter() - t0
