"""The Python API: `Llama(model)` with the calls llama-cpp-python users know, plus a plain `generate`.

    from llamba import Llama
    llm = Llama("smollm2-135m")
    print(llm.generate("The capital of France is", max_tokens=16, temperature=0))
    for chunk in llm.create_chat_completion([{"role": "user", "content": "Hi!"}], stream=True): ...

The KV cache is kept between calls: a prompt that starts with the tokens already evaluated only runs the
rest (what makes a chat's second turn cheap).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .compiling import ensure_compiled, warm_up
from .errors import BadRequestError, LlambaError
from .generation.decoding import DEFAULT_DECODING, Speculation, make_speculation
from .generation.generate import GenerationStats, Step, generate_steps
from .generation.sampling import Sampler, SamplingParams
from .memory.kv_cache import QUANTIZED, check_kv_type
from .memory.sequence import Sequence
from .models import load_transformer
from .models.metadata import MAX_CONTEXT
from .ops.threads import set_threads
from .store import resolve_model
from .text import openai
from .text.chat_template import load_chat_template, turn_terminator
from .text.stream import TextStream
from .text.tokenizer import Tokenizer

DEFAULT_CTX = 4096
# what a quantized KV cache measures the model's keys on (memory/kv_cache.py, KeyStatistics): prose and code
KEY_CALIBRATION_TEXT = (
    "The library opens at nine on weekdays. Members may borrow up to ten books for three weeks, and renew them "
    "online unless someone else has asked for them.\n\n"
    "def mean(values):\n    \"\"\"The arithmetic mean of a non-empty list.\"\"\"\n"
    "    return sum(values) / len(values)\n\n"
    "Q: What is the boiling point of water at sea level?\nA: 100 degrees Celsius, or 212 degrees Fahrenheit.")
MIN_CTX = 8

_SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


class Llama:
    """A loaded model with its tokenizer, chat template and KV cache."""

    def __init__(self, model: str | os.PathLike | None = None, n_ctx: int | None = None,
                 n_threads: int | None = None, chat_template: str | None = None, kv_type: str = "f32",
                 on_status: Callable[[str], None] | None = None, decoding: str | None = None):
        if n_threads is not None and n_threads < 1:
            raise LlambaError(f"threads must be at least 1 (got {n_threads}); leave it out to use every core")
        self.n_threads = set_threads(n_threads)
        say = on_status or (lambda message: None)
        check_kv_type(kv_type)
        self.model_path = Path(resolve_model(model, say=say))
        ensure_compiled(self.model_path, kv_type)
        self.model = load_transformer(self.model_path)
        self.tokenizer = Tokenizer(self.model.gguf.metadata, str(self.model_path))
        self.template = load_chat_template(self.model.gguf.metadata, self.tokenizer.tokens, self.tokenizer.token_to_id,
                                           self.tokenizer.bos_id, self.tokenizer.eos_id, chat_template)
        self.tokenizer.add_end_of_generation(turn_terminator(self.template))
        hp = self.model.hp
        self.n_ctx = _context_size(n_ctx, hp.n_ctx_train)
        if kv_type in QUANTIZED:
            self.model.calibrate_keys(self.tokenizer.encode(KEY_CALIBRATION_TEXT))
        self.cache = self.model.new_cache(self.n_ctx, kv_type)
        self.sequence = Sequence(self.cache)  # what the cache holds, position by position
        self.last_stats = GenerationStats()
        self.decoding = decoding or DEFAULT_DECODING
        self._speculations: dict[str, Speculation | None] = {}
        self.speculation(decoding)  # a bad name or draft model fails now, not at the first generation
        self.warm_up()

    def speculation(self, decoding: str | None = None) -> Speculation | None:
        """The decoder for a `--decoding` name (kept, so its measurements and draft cache carry over)."""
        name = decoding or self.decoding
        if name not in self._speculations:
            self._speculations[name] = make_speculation(name, self.model, self.n_ctx, self.cache.kv_type,
                                                        load_model=lambda m: load_transformer(resolve_model(m)))
        return self._speculations[name]

    def warm_up(self) -> None:
        """Load (or, on a first run, compile) the kernels now, not at the first request."""
        warm_up(self.model, self.cache.kv_type)

    # ------------------------------------------------------------------------------------- tokens

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the chat template and tokenize, special tokens recognised."""
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        bos = self.template.bos_token
        add_bos = not (bos and text.startswith(bos))  # templates that write BOS themselves get no second one
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=True)

    # ------------------------------------------------------------------------------------- evaluation

    def reset(self) -> None:
        self.sequence.keep(0)

    def logits(self, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """Logits for ids evaluated from position 0 on a fresh cache (the cache is reset)."""
        self.reset()
        out = self.model.forward_tokens(ids, 0, self.cache, all_logits=all_positions)
        self.sequence.extend(ids)
        return out

    def stream_tokens(self, prompt_ids: list[int], max_tokens: int = 256, stop: list[str] | None = None,
                      sampler: Sampler | None = None, decoding: str | None = None, **sampling: Any) -> Iterator[Step]:
        """The core loop with prefix reuse: yields Steps; `last_stats` holds the timings after."""
        if not prompt_ids:
            raise BadRequestError("the prompt is empty")
        if max_tokens < -1:
            raise BadRequestError(f"max_tokens must be >= 0, or -1 for no limit but the context (got {max_tokens})")
        if max_tokens == -1:
            max_tokens = self.n_ctx
        sampler = sampler or Sampler(**_sampling_args(sampling))
        start = self.sequence.common_prefix(prompt_ids)
        stats = self.last_stats = GenerationStats()
        generated: list[int] = []
        try:
            for step in generate_steps(self.model, TextStream(self.tokenizer, stop), self.cache, prompt_ids,
                                       sampler, max_tokens, start_pos=start, stats=stats,
                                       speculation=self.speculation(decoding)):
                if step.token >= 0:
                    generated.append(step.token)
                yield step
        except (KeyboardInterrupt, GeneratorExit):
            stats.finish_reason = "interrupted"
            raise
        finally:
            self.sequence.evaluated(list(prompt_ids) + generated)

    # ------------------------------------------------------------------------------------- text API

    def generate(self, prompt: str, max_tokens: int = 256, stop: list[str] | None = None, **sampling: Any) -> str:
        """The continuation of prompt as one string."""
        steps = self.stream_tokens(self.tokenize(prompt), max_tokens=max_tokens, stop=stop, **sampling)
        return "".join(step.text for step in steps)

    def create_completion(self, prompt: str | list[int], max_tokens: int = 16, stop: str | list[str] | None = None,
                          stream: bool = False, **sampling: Any):
        """An OpenAI-shaped text completion (or an iterator of chunks with stream=True)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else stop
        steps = self.stream_tokens(ids, max_tokens=max_tokens, stop=stops, **sampling)
        meta = self._meta("cmpl")
        if stream:
            return self._completion_chunks(steps, meta)
        text = "".join(step.text for step in steps)
        return openai.completion(meta, text, self._finish(), self._usage())

    def _completion_chunks(self, steps, meta) -> Iterator[dict]:
        for step in steps:
            if step.text:
                yield openai.completion_chunk(meta, step.text)
        yield openai.completion_chunk(meta, "", self._finish())

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None,
                               stop: str | list[str] | None = None, stream: bool = False, **sampling: Any):
        """An OpenAI-shaped chat completion (or an iterator of chunks with stream=True)."""
        ids = self.chat_prompt_ids(messages)
        stops = [stop] if isinstance(stop, str) else stop
        steps = self.stream_tokens(ids, max_tokens=self.n_ctx if max_tokens is None else max_tokens, stop=stops, **sampling)
        meta = self._meta("chatcmpl")
        if stream:
            return self._chat_chunks(steps, meta)
        text = "".join(step.text for step in steps)
        return openai.chat_completion(meta, text, self._finish(), self._usage())

    def _chat_chunks(self, steps, meta) -> Iterator[dict]:
        yield openai.chat_chunk(meta, {"role": "assistant"})
        for step in steps:
            if step.text:
                yield openai.chat_chunk(meta, {"content": step.text})
        yield openai.chat_chunk(meta, {}, self._finish())

    def _meta(self, kind: str) -> dict:
        return openai.response_meta(kind, str(self.model_path))

    def _finish(self) -> str:
        return openai.openai_finish_reason(self.last_stats.finish_reason)

    def _usage(self) -> dict:
        return openai.usage(self.last_stats.prompt_tokens, self.last_stats.generated_tokens)


def _context_size(n_ctx: int | None, n_ctx_train: int) -> int:
    """None: the model's context, at most DEFAULT_CTX; 0: the model's whole context (as llama.cpp)."""
    if n_ctx is None:
        return min(n_ctx_train, DEFAULT_CTX)
    if n_ctx == 0:
        return n_ctx_train
    if not MIN_CTX <= n_ctx <= MAX_CONTEXT:
        raise LlambaError(f"context size must be in {MIN_CTX}..{MAX_CONTEXT}, or 0 for the model's own "
                          f"({n_ctx_train}) (got {n_ctx})")
    return n_ctx


def _sampling_args(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _SAMPLING_KEYS
    if unknown:
        raise BadRequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return {k: v for k, v in options.items() if v is not None}
