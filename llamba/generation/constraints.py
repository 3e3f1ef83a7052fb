"""Constrained decoding on llguidance: output that follows a JSON schema, a grammar or a regular expression.

A constraint is compiled once per generation into an llguidance matcher over the model's vocabulary; the
sampler then has one more stage, GrammarMask, first in its chain: before each draw it asks the matcher which
tokens may come next and sets every other logit to -inf; after the draw the matcher consumes the token. When
the grammar is complete the matcher allows only the end-of-generation tokens, so a finished answer is one that
parses. No grammar engine lives here: llguidance computes the masks (in Rust, a fraction of a millisecond).

Formats: JSON Schema (dict or JSON text), llama.cpp's GBNF, Lark (llguidance's dialect) and regular
expressions. A bad one is a BadRequestError naming llguidance's complaint.

Guessing ahead needs nothing special: the guesses are verified by sampling each row through the same chain,
in order, so the matcher sees exactly the tokens that become output; drafters that ask the sampler about
positions ahead of the matcher (a draft model) get unmasked distributions (see GrammarMask.apply).
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from typing import Callable

import llguidance
import numpy as np

from ..errors import BadRequestError
from .sampling import Candidates

FORMATS = ("json_schema", "gbnf", "lark", "regex")

# JSON whitespace as llama.cpp's schema grammars allow it: none, one space, or a newline and an indent. The
# default (any run of whitespace) lets a small model fill its budget with newlines instead of closing the object.
JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})?"}


@dataclass(frozen=True)
class Constraint:
    """What the output must follow: format (one of FORMATS) and its source text."""

    format: str
    source: str

    @staticmethod
    def json_schema(schema: dict | str) -> "Constraint":
        """From a schema (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise BadRequestError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise BadRequestError(f"a JSON schema must be an object (got {type(schema).__name__})")
        return Constraint("json_schema", json.dumps(schema))

    def grammar(self) -> str:
        """llguidance's grammar for this constraint (not yet checked against a vocabulary)."""
        try:
            if self.format == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
            if self.format == "gbnf":
                return llguidance.grammar_from("gbnf", self.source)
            if self.format == "lark":
                return llguidance.LLMatcher.grammar_from_lark(self.source)
            if self.format == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.source)
        except ValueError as e:
            raise BadRequestError(f"invalid {self.label}: {_one_line(e)}") from None
        raise BadRequestError(f"unknown constraint format {self.format!r} (choose from {', '.join(FORMATS)})")

    @property
    def label(self) -> str:
        return {"json_schema": "JSON schema", "gbnf": "GBNF grammar", "lark": "Lark grammar",
                "regex": "regular expression"}.get(self.format, self.format)


def constraint_from(json_schema: dict | str | None = None, grammar: str | None = None, regex: str | None = None,
                    lark: str | None = None) -> Constraint | None:
    """The one constraint among these options (None if none is given; two at once is a BadRequestError)."""
    given = [(name, value) for name, value in (("json_schema", json_schema), ("grammar", grammar),
                                               ("regex", regex), ("lark", lark)) if value is not None]
    if len(given) > 1:
        raise BadRequestError(f"give one of json_schema, grammar, regex (got {', '.join(n for n, _ in given)})")
    if not given:
        return None
    name, value = given[0]
    if name == "json_schema":
        return Constraint.json_schema(value)
    if not isinstance(value, str) or not value.strip():
        raise BadRequestError(f"{name} must be a non-empty string")
    return Constraint("gbnf" if name == "grammar" else name, value)


class GrammarVocabulary:
    """The model's vocabulary as llguidance sees it, built once per model (about a second for 150k tokens).

    token_bytes: each token's bytes in id order (special tokens b"\\xff" + name: never matched as text);
    encode: text -> ids without special tokens (llguidance re-tokenizes forced text with it); eog_ids: the
    tokens that end a generation, which the matcher allows once the grammar is complete."""

    def __init__(self, token_bytes: list[bytes], encode: Callable[[str], list[int]], eog_ids: set[int],
                 n_vocab: int):
        self.n_vocab = n_vocab
        self.eog_ids = sorted(eog_ids)
        self.token_bytes = token_bytes + [b""] * (n_vocab - len(token_bytes))
        wrapper = _Wrapper(self.token_bytes, encode, self.eog_ids[0])
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=n_vocab,
                                                  eos_token=self.eog_ids)

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one generation; an invalid constraint is a BadRequestError."""
        grammar = constraint.grammar()
        error = llguidance.LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise BadRequestError(f"invalid {constraint.label}: {_one_line(error)}")
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise BadRequestError(f"invalid {constraint.label}: {_one_line(matcher.get_error())}")
        return matcher

    def token_text(self, token: int) -> bytes:
        """A token's bytes as the output shows them: a special token as its name (b"<tool_call>")."""
        piece = self.token_bytes[token]
        return piece[1:] if piece[:1] == b"\xff" else piece


@dataclass(frozen=True)
class Trigger:
    """Where a lazy grammar starts (llama.cpp's grammar triggers): the output is free until `pattern` (a
    regular expression) matches the text so far, and the grammar then constrains the text from the start of
    its first group on (which the grammar itself begins with: `<tool_call>`, `[TOOL_CALLS]`, the `{` of a
    JSON call). at_start: the pattern must match from the output's first character (a call that is the
    whole answer), else anywhere."""

    pattern: str
    at_start: bool = False

    def find(self, text: bytes) -> int | None:
        """Where the grammar's part of text starts, or None while the trigger has not appeared."""
        pattern = self.pattern.encode("utf-8")
        match = (re.match if self.at_start else re.search)(pattern, text)
        return match.start(1) if match else None


@dataclass
class _Wrapper:
    """What llguidance.TokenizerWrapper reads: tokens, eos and bos ids, and a call that tokenizes bytes."""

    tokens: list[bytes]
    encode: Callable[[str], list[int]]
    eos_token_id: int
    bos_token_id: int | None = None

    def __call__(self, data: bytes) -> list[int]:
        return self.encode(data.decode("utf-8", errors="replace"))


class GrammarMask:
    """The sampler stage that keeps only the tokens the grammar allows next (first in the chain).

    The matcher follows the output: `accept` feeds it each token drawn. The stage knows the history length its
    matcher stands at, so a call about any other position (a draft model drafting several tokens ahead through
    the same sampler) passes unmasked: its guesses are checked at verification, where the position is right.

    trigger: a lazy grammar (llama.cpp's term): the output is free until the trigger appears in it, and the
    grammar then constrains it from the trigger's start (a tool call from its `<tool_call>`).
    """

    def __init__(self, vocabulary: GrammarVocabulary, constraint: Constraint, trigger: Trigger | None = None):
        self.vocabulary = vocabulary
        self.matcher = vocabulary.matcher(constraint)
        self.bitmask = np.zeros((vocabulary.n_vocab + 31) // 32, np.int32)
        self.trigger = trigger
        self.active = trigger is None
        self._free: list[int] = []  # the tokens drawn before the trigger appeared,
        self._text = b""  # their text,
        self._starts: list[int] = []  # and where each one starts in it
        self._at: int | None = None  # the history length the matcher stands at (set by the first apply)
        self._mask_for = -1  # the history length self.bitmask was computed for

    def apply(self, c: Candidates, history: list[int]) -> Candidates:
        if self._at is None:
            self._at = len(history)
        if not self.active or len(history) != self._at or self.matcher.is_error():
            return c
        return Candidates(c.ids, np.where(self.allowed(), c.logits, np.float32(-np.inf)))

    def allowed(self) -> np.ndarray:
        """A bool per vocabulary entry: may it come next? (Computed once per position: verification may
        ask again for the same row.)"""
        if self._mask_for != self._at:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            self._mask_for = self._at
        return np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.vocabulary.n_vocab].view(bool)

    def accept(self, token: int) -> None:
        if self._at is None:
            return
        self._at += 1
        if not self.active:
            self._free.append(token)
            self._look_for_trigger()
        elif not self.matcher.is_stopped():  # past the end (an end-of-generation token) there is nothing to feed
            self.matcher.consume_token(token)

    def _look_for_trigger(self) -> None:
        """Start the grammar once the trigger is in the output, feeding it the output from the trigger on: the
        tokens themselves when the trigger starts at a token's start (a special token stays itself), else
        that text's own tokens (the token the trigger begins inside was drawn free)."""
        self._starts.append(len(self._text))
        self._text += self.vocabulary.token_text(self._free[-1])
        start = self.trigger.find(self._text)
        if start is None:
            return
        self.active = True
        at = bisect.bisect_left(self._starts, start)
        if at < len(self._free) and self._starts[at] == start:
            tokens = self._free[at:]
        else:
            tokens = self.vocabulary.lltokenizer.tokenize_bytes(self._text[start:])
        self.matcher.consume_tokens(tokens)

    @property
    def finished(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar."""
        return self.matcher.is_accepting()


def _one_line(error) -> str:
    return " ".join(str(error).split())
