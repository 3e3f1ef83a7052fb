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
from .generation.constraints import Constraint, GrammarMask, GrammarVocabulary, Trigger, constraint_from
from .generation.decoding import DEFAULT_DECODING, Speculation, make_speculation
from .generation.embedding import EmbeddingJob, embed_tokens, pooling_named
from .generation.generate import GenerationStats, Step, generate_steps
from .generation.sampling import Sampler, SamplingParams
from .memory.kv_cache import QUANTIZED, check_kv_type
from .memory.sequence import Sequence
from .models import load_transformer, read_hparams
from .models.metadata import MAX_CONTEXT
from .ops.threads import set_threads
from .store import resolve_model
from .text import openai
from .text.chat_template import load_chat_template, turn_terminator
from .text.stream import TextStream
from .text.tool_formats import detect_format
from .text.tools import ChatPlan, plan_chat
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
DRAFT_ENV = "LLAMBA_DRAFT"  # the draft model auto asks, when none is given (a name or a path; "none": no draft)

_SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


class Llama:
    """A loaded model with its tokenizer, chat template and KV cache."""

    def __init__(self, model: str | os.PathLike | None = None, n_ctx: int | None = None,
                 n_threads: int | None = None, chat_template: str | None = None, kv_type: str = "f32",
                 on_status: Callable[[str], None] | None = None, decoding: str | None = None,
                 draft_model: str | os.PathLike | None = None):
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
        self._drafts: dict[str, object] = {}  # name -> a loaded draft model, shared by the decoders that ask it
        self._speculations: dict[str, Speculation | None] = {}
        self._grammar_vocabulary: GrammarVocabulary | None = None
        self.draft_model = _no_none(draft_model)
        if draft_model is None and _no_none(os.environ.get(DRAFT_ENV)):
            self._take_configured_draft(os.environ[DRAFT_ENV], say)
        self.speculation(decoding)  # a bad name or draft model fails now, not at the first generation
        self.warm_up()

    def speculation(self, decoding: str | None = None) -> Speculation | None:
        """The decoder for a `--decoding` name (kept, so its measurements and draft cache carry over)."""
        name = decoding or self.decoding
        if name not in self._speculations:
            self._speculations[name] = make_speculation(name, self.model, self.n_ctx, self.cache.kv_type,
                                                        load_model=self._load_draft, draft=self.draft_model)
        return self._speculations[name]

    def _take_configured_draft(self, name: str, say: Callable[[str], None]) -> None:
        """The draft model set in the environment, if it fits this model (one default serves every model that
        shares its vocabulary; any other just copies). Its vocabulary is read from the metadata: a draft that
        does not fit is never loaded."""
        try:
            n_vocab = read_hparams(resolve_model(name)).n_vocab
        except LlambaError as e:
            raise LlambaError(f"{DRAFT_ENV}: {e}") from None
        if n_vocab == self.model.hp.n_vocab:
            self.draft_model = name
        else:
            say(f"{DRAFT_ENV}={name} has another vocabulary than this model: auto guesses by copying only")

    def _load_draft(self, name: str):
        if name not in self._drafts:
            self._drafts[name] = load_transformer(resolve_model(name))
        return self._drafts[name]

    def warm_up(self) -> None:
        """Load (or, on a first run, compile) the kernels now, not at the first request."""
        warm_up(self.model, self.cache.kv_type)

    # ------------------------------------------------------------------------------------- tokens

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        return self.tokenizer.decode(ids, special=special)

    def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                        plan: ChatPlan | None = None) -> list[int]:
        """Render messages with the chat template (and a chat plan's tools, the messages as its tool format
        wants them) and tokenize, special tokens recognised."""
        plan = plan or ChatPlan()
        text = self.template.render(plan.prompt_messages(messages, self.template.source),
                                    add_generation_prompt=add_generation_prompt, tools=plan.tools,
                                    **plan.template_variables)
        bos = self.template.bos_token
        add_bos = not (bos and text.startswith(bos))  # templates that write BOS themselves get no second one
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=True)

    @property
    def grammar_vocabulary(self) -> GrammarVocabulary:
        """The vocabulary as llguidance reads it, built at the first constrained generation and kept."""
        if self._grammar_vocabulary is None:
            tok = self.tokenizer
            self._grammar_vocabulary = GrammarVocabulary(tok.vocabulary_bytes(), lambda text: tok.encode(
                text, add_special=False), tok.eog_ids, self.model.hp.n_vocab)
        return self._grammar_vocabulary

    def sampler(self, constraint: Constraint | None = None, trigger: Trigger | None = None,
                **sampling: Any) -> Sampler:
        """A sampler for these options, with a grammar mask first in its chain when a constraint is given
        (trigger: where it starts, for a lazy grammar)."""
        mask = GrammarMask(self.grammar_vocabulary, constraint, trigger) if constraint is not None else None
        return Sampler(constraint=mask, **_sampling_args(sampling))

    def chat_plan(self, tools: list | None = None, tool_choice=None, response_format: dict | None = None,
                  parallel_tool_calls: bool = False) -> ChatPlan:
        """How a chat request's tools and response_format shape its prompt and answer (text/tools.py), in the
        tool-call format the chat template writes (text/tool_formats.py)."""
        return plan_chat(tools, tool_choice, response_format, parallel_tool_calls,
                         detect_format(self.template.source), self._special_id)

    def _special_id(self, text: str) -> int | None:
        """The id of the special token that is this text, if the vocabulary has one."""
        token = self.tokenizer.token_to_id.get(text)
        return token if token is not None and self.tokenizer.is_special(token) else None

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
                      sampler: Sampler | None = None, decoding: str | None = None,
                      constraint: Constraint | None = None, **sampling: Any) -> Iterator[Step]:
        """The core loop with prefix reuse: yields Steps; `last_stats` holds the timings after. `constraint`:
        the output follows this schema or grammar (see generation/constraints.py)."""
        if not prompt_ids:
            raise BadRequestError("the prompt is empty")
        if max_tokens < -1:
            raise BadRequestError(f"max_tokens must be >= 0, or -1 for no limit but the context (got {max_tokens})")
        if max_tokens == -1:
            max_tokens = self.n_ctx
        sampler = sampler or self.sampler(constraint, **sampling)
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

    # ------------------------------------------------------------------------------------- embeddings

    @property
    def pooling(self) -> str:
        """How embed pools a text's hidden states: the file's pooling type, else mean (generation/embedding.py)."""
        return pooling_named(self.model.gguf.arch_value("pooling_type"), self.model.hp.arch)

    def embed_ids(self, texts: list[list[int]], normalize: bool = True) -> np.ndarray:
        """The pooled vectors [n_texts, n_embd] of token lists (each evaluated in a cache of its own: the
        chat's cache is left as it was)."""
        return embed_tokens(self.model, texts, self.pooling, self.n_ctx, normalize)

    def embedding_job(self, texts: list[list[int]], normalize: bool = True) -> EmbeddingJob:
        """embed_ids a forward at a time (EmbeddingJob.step), for a caller with other work between them."""
        return EmbeddingJob(self.model, texts, self.pooling, self.n_ctx, normalize)

    def embed_input_ids(self, input: str | list) -> list[list[int]]:
        """An embeddings input as OpenAI takes it (a text, a list of texts, a token list or a list of token
        lists) -> the token lists; texts get the BOS token as llama.cpp's embedding mode adds it."""
        if isinstance(input, str):
            input = [input]
        if not isinstance(input, list) or not input:
            raise BadRequestError("input must be a non-empty string, list of strings or list of token ids")
        if _is_token_list(input):
            input = [input]
        texts = []
        for i, item in enumerate(input):
            if isinstance(item, str):
                if not item:
                    raise BadRequestError(f"input {i} is an empty string")
                texts.append(self.tokenize(item))
            elif _is_token_list(item):
                if any(not 0 <= t < self.model.hp.n_vocab for t in item):
                    raise BadRequestError(f"input {i}: token ids must be in 0..{self.model.hp.n_vocab - 1}")
                texts.append(list(item))
            else:
                raise BadRequestError(f"input {i} is neither a string nor a list of token ids")
        return texts

    def embed(self, input: str | list, normalize: bool = True) -> list[float] | list[list[float]]:
        """llama-cpp-python's embed: a text's vector, or a list of vectors for a list of texts (or token
        lists). Unit length unless normalize=False, as llama-server's."""
        vectors = self.embed_ids(self.embed_input_ids(input), normalize).tolist()
        return vectors[0] if isinstance(input, str) or _is_token_list(input) else vectors

    def create_embedding(self, input: str | list, model: str | None = None, normalize: bool = True) -> dict:
        """An OpenAI-shaped embeddings response (llama-cpp-python's create_embedding)."""
        texts = self.embed_input_ids(input)
        vectors = self.embed_ids(texts, normalize)
        return openai.embeddings(model or str(self.model_path), vectors.tolist(), sum(map(len, texts)))

    # ------------------------------------------------------------------------------------- text API

    def generate(self, prompt: str, max_tokens: int = 256, stop: list[str] | None = None,
                 json_schema: dict | str | None = None, grammar: str | None = None, regex: str | None = None,
                 **sampling: Any) -> str:
        """The continuation of prompt as one string; json_schema (a dict or its JSON), grammar (GBNF) or
        regex constrain it (`last_stats.finish_reason` is "length" if the budget ran out first)."""
        steps = self.stream_tokens(self.tokenize(prompt), max_tokens=max_tokens, stop=stop,
                                   constraint=constraint_from(json_schema, grammar, regex), **sampling)
        return "".join(step.text for step in steps)

    def create_completion(self, prompt: str | list[int], max_tokens: int = 16, stop: str | list[str] | None = None,
                          stream: bool = False, json_schema: dict | str | None = None, grammar: str | None = None,
                          regex: str | None = None, **sampling: Any):
        """An OpenAI-shaped text completion (or an iterator of chunks with stream=True)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else stop
        steps = self.stream_tokens(ids, max_tokens=max_tokens, stop=stops,
                                   constraint=constraint_from(json_schema, grammar, regex), **sampling)
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
                               stop: str | list[str] | None = None, stream: bool = False,
                               response_format: dict | None = None, tools: list[dict] | None = None,
                               tool_choice: str | dict | None = None, parallel_tool_calls: bool = False,
                               decoding: str | None = None, **sampling: Any):
        """An OpenAI-shaped chat completion (or an iterator of chunks with stream=True). response_format,
        tools and tool_choice as llama-cpp-python and OpenAI take them: see text/tools.py."""
        plan = self.chat_plan(tools, tool_choice, response_format, parallel_tool_calls)
        ids = self.chat_prompt_ids(messages, plan=plan)
        stops = [stop] if isinstance(stop, str) else stop
        sampler = self.sampler(plan.constraint, plan.trigger, **sampling)
        steps = self.stream_tokens(ids, max_tokens=self.n_ctx if max_tokens is None else max_tokens, stop=stops,
                                   sampler=sampler, decoding=decoding)
        meta = self._meta("chatcmpl")
        if stream:
            return self._chat_chunks(steps, meta, plan)
        text = "".join(step.text for step in steps)
        content, calls = plan.split(text)
        return openai.chat_completion(meta, content, self._finish(), self._usage(), tool_calls=calls)

    def _chat_chunks(self, steps, meta, plan: ChatPlan) -> Iterator[dict]:
        yield openai.chat_chunk(meta, {"role": "assistant"})
        deltas = plan.deltas()
        for step in steps:
            for delta in deltas.feed(step.text):
                yield openai.chat_chunk(meta, delta)
        for delta in deltas.flush():
            yield openai.chat_chunk(meta, delta)
        yield openai.chat_chunk(meta, {}, openai.chat_finish_reason(self._finish(), bool(deltas.calls)))

    def _meta(self, kind: str) -> dict:
        return openai.response_meta(kind, str(self.model_path))

    def _finish(self) -> str:
        return openai.openai_finish_reason(self.last_stats.finish_reason)

    def _usage(self) -> dict:
        return openai.usage(self.last_stats.prompt_tokens, self.last_stats.generated_tokens)


def _is_token_list(value) -> bool:
    """A list of token ids (ints, not bools; an empty list counts: its emptiness is refused by name later)."""
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _no_none(name):
    """A draft model's name, None for none ('none' or empty is how a command line or environment says none)."""
    return None if name is None or str(name).strip().lower() in ("", "none") else name


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
