"""A chat session: the conversation, its settings, and a KV cache reused across turns.

Each turn renders the whole conversation with the chat template; the Llama object evaluates only the tokens
after the prefix its cache already holds, so turn 2 costs its new tokens, not the history. When a turn would
not fit the context, the session either drops the oldest exchanges (keeping the system prompt) and says so,
or refuses with a clear error, by option.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .api import Llama
from .errors import BadRequestError, ContextOverflowError, LlambaError
from .generation.generate import Step
from .generation.constraints import Constraint
from .memory.kv_cache import QUANTIZED, ROW_DTYPE
from .generation.sampling import OPTIONS, SamplingParams, option_type, repl_key

FORMAT = "llamba-chat-session/1"


@dataclass
class ChatSettings:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    overflow: str = "shift"  # shift | stop
    format: Constraint | None = None  # what each answer must follow (a JSON schema, a grammar...), or free text

    def set(self, key: str, value: str) -> None:
        """Set one setting from text, as the REPL's /set does; raises LlambaError on a bad key or value."""
        option = SETTINGS.get(key) or (SETTINGS["temp"] if key == "temperature" else None)
        if option is None:
            raise BadRequestError(f"unknown setting {key!r} (settings: {', '.join(sorted(SETTINGS))})")
        try:
            parsed = int(value) if option is MAX_TOKENS or option_type(option) is int else float(value)
        except ValueError:
            raise BadRequestError(f"{key} needs a number, not {value!r}") from None
        if option is MAX_TOKENS:
            if parsed < 1:
                raise BadRequestError("max_tokens must be >= 1")
            self.max_tokens = parsed
            return
        candidate = SamplingParams(**{**asdict(self.sampling), option.name: parsed})
        self.sampling = candidate.validate()


MAX_TOKENS = "max_tokens"  # the one setting that is not a sampling option
# the REPL's /set keys, generated from SamplingParams: key -> its option (or MAX_TOKENS)
SETTINGS = {**{repl_key(option): option for option in OPTIONS}, "max_tokens": MAX_TOKENS}


def settings_help() -> str:
    """The /set keys with their help, for the REPL's /help."""
    lines = [f"    {repl_key(o):<18} {o.metadata['help']}" for o in OPTIONS]
    return "\n".join(lines + [f"    {'max_tokens':<18} Tokens an answer may have at most."])


class ChatSession:
    def __init__(self, llm: Llama, system: str | None = None, settings: ChatSettings | None = None,
                 notify: Callable[[str], None] | None = None):
        self.llm = llm
        self.settings = settings or ChatSettings()
        self.system = system
        self.messages: list[dict] = []
        self.notify = notify or (lambda message: None)

    # ----------------------------------------------------------------------------------- turns

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def send(self, text: str) -> Iterator[Step]:
        """Add a user message and stream the answer; the answer (even a partial one) joins the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            yield from self._answer()
        finally:
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()  # stopped before any answer: as if the message had not been sent

    def regenerate(self) -> Iterator[Step]:
        """Drop the last answer and answer the last user message again."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise LlambaError("there is no answer to regenerate yet")
        self.messages.pop()
        yield from self._answer()

    def _answer(self) -> Iterator[Step]:
        ids = self._fitting_prompt()
        s = self.settings
        pieces: list[str] = []
        try:
            for step in self.llm.stream_tokens(ids, max_tokens=s.max_tokens, constraint=s.format,
                                               **asdict(s.sampling)):
                pieces.append(step.text)
                yield step
        finally:
            if pieces or self.llm.last_stats.finish_reason != "interrupted":
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            if self.llm.last_stats.finish_reason == "context":
                self.notify("the context is full: the answer was cut off (/reset, or start with a larger -c)")

    def _fitting_prompt(self) -> list[int]:
        """The prompt ids, dropping the oldest exchanges (system prompt kept) until the answer has room."""
        reserve = min(self.settings.max_tokens, self.llm.n_ctx // 4)
        dropped = 0
        while True:
            ids = self.llm.chat_prompt_ids(self.conversation())
            if len(ids) + reserve <= self.llm.n_ctx:
                break
            if self.settings.overflow == "stop" or len(self.messages) <= 1:
                self.messages.pop()  # the new user message is not part of the history after all
                raise ContextOverflowError(f"the conversation ({len(ids)} tokens) no longer fits the context of "
                                  f"{self.llm.n_ctx} tokens with room to answer: /reset, or start with a larger -c")
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
            dropped += 1
        if dropped:
            self.notify(f"context full: dropped the {dropped} oldest exchange(s), kept the system prompt")
        return ids

    def reset(self) -> None:
        self.messages = []
        self.llm.reset()

    # ----------------------------------------------------------------------------------- files

    def save(self, path: str | Path, with_kv: bool = False) -> Path:
        """Write the conversation and settings as JSON; with_kv also writes the KV cache beside it, marked
        with the model, KV type and context it belongs to."""
        path = Path(path).expanduser()
        identity = model_identity(self.llm)
        data = {"format": FORMAT, "model": str(self.llm.model_path), "model_identity": identity,
                "system": self.system, "messages": self.messages, "max_tokens": self.settings.max_tokens,
                "sampling": asdict(self.settings.sampling)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, lambda f: f.write(json.dumps(data, indent=2, ensure_ascii=False).encode()))
            if with_kv:
                self._save_kv(_kv_path(path), identity)
        except OSError as e:
            raise LlambaError(f"{path}: cannot save ({e.strerror})") from None
        return path

    def _save_kv(self, path: Path, identity: dict) -> None:
        keys, values = self.llm.cache.read_seq(0)
        n = keys[0].shape[1]
        arrays = {f"k{i}": k for i, k in enumerate(keys)} | {f"v{i}": v for i, v in enumerate(values)}
        marks = {"kv_type": np.array(self.llm.cache.kv_type), "identity": np.array(json.dumps(identity))}
        stats = self.llm.cache.key_stats
        if stats is not None:  # a quantized cache's keys mean nothing without the centre and spread taken out
            marks |= {"key_centre": np.stack(stats.centre), "key_spread": np.stack(stats.spread)}
        _write_atomically(path, lambda f: np.savez(f, tokens=np.asarray(self.llm.sequence.tokens[:n], dtype=np.int64),
                                                   **marks, **arrays))

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one (and its KV cache, when saved with it and it fits this
        model exactly). A malformed file changes nothing."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise LlambaError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise LlambaError(f"{path}: not a saved llamba chat session") from None
        system, messages, max_tokens, sampling = _parse_session(data, path)
        self.settings.sampling, self.settings.max_tokens = sampling, max_tokens
        self.system, self.messages = system, messages
        self.llm.reset()
        kv_path = _kv_path(path)
        if kv_path.is_file():
            self._load_kv(kv_path)

    def _load_kv(self, path: Path) -> None:
        """Restore the saved cache, or say why not (the conversation is then recomputed at the next turn)."""
        try:
            tokens, keys, values = _read_kv(path, self.llm)
        except _Unusable as e:
            self.notify(f"{path.name}: {e}; the cache will be recomputed")
            return
        self.llm.sequence.restore(tokens, keys, values)


class _Unusable(Exception):
    """A saved KV cache that cannot be used as it is (the reason is the message)."""


def model_identity(llm: Llama) -> dict:
    """What a saved KV cache must match: the model file (size and a hash of its header) and its shape."""
    hp = llm.model.hp
    with open(llm.model_path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return {"file_bytes": llm.model_path.stat().st_size, "header_sha256": head, "arch": hp.arch,
            "n_layer": hp.n_layer, "n_head_kv": hp.n_head_kv, "head_dim": hp.head_dim, "n_vocab": hp.n_vocab}


def _read_kv(path: Path, llm: Llama) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    cache = llm.cache
    n_layer = len(cache.k)
    expected_identity = model_identity(llm)
    try:
        with np.load(path, allow_pickle=False) as kv:
            identity = json.loads(str(kv["identity"])) if "identity" in kv.files else None
            if identity == expected_identity:
                saved_type = str(kv["kv_type"])
                saved_stats = [kv[name] if name in kv.files else None for name in ("key_centre", "key_spread")]
                tokens = kv["tokens"]
                keys = [kv[f"k{i}"] for i in range(n_layer)]
                values = [kv[f"v{i}"] for i in range(n_layer)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        raise _Unusable("not a readable llamba KV cache") from None
    if identity != expected_identity:
        raise _Unusable("it was saved with a different model")
    n = len(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or n == 0 or n > cache.n_ctx:
        raise _Unusable(f"its {n} positions do not fit this context of {cache.n_ctx}")
    if ((tokens < 0) | (tokens >= llm.model.hp.n_vocab)).any():
        raise _Unusable("it holds token ids outside the vocabulary")
    if saved_type in QUANTIZED or cache.kv_type in QUANTIZED:
        if saved_type != cache.kv_type:
            raise _Unusable(f"it holds a {saved_type} cache and this session's is {cache.kv_type} "
                            f"(run with --kv-type {saved_type} to use it)")
        stats = cache.key_stats
        if not all(s is not None and np.array_equal(s, np.stack(mine))
                   for s, mine in zip(saved_stats, (stats.centre, stats.spread))):
            raise _Unusable("its keys were quantized about another centre and spread than this cache's")
    expected = (cache.k[0].shape[0], n, cache.k[0].shape[2])
    if any(a.shape != expected for a in keys + values):
        raise _Unusable("its arrays do not have this model's shape")
    return tokens.tolist(), *_convert_kv(keys + values, saved_type, cache.kv_type, n_layer)


def _convert_kv(arrays: list[np.ndarray], saved: str, wanted: str, n_layer: int):
    """Saved arrays as this cache stores them: f16 widens to f32 exactly; f32 would round, so it is refused
    (quantized types are only ever loaded into their own type)."""
    stored = {"f32": np.float32, "f16": np.uint16} | ROW_DTYPE
    if saved not in stored or any(a.dtype != stored[saved] for a in arrays):
        raise _Unusable("its arrays are not of the KV type it names")
    if saved != wanted:
        if saved == "f32":
            raise _Unusable("it holds f32 keys and values, and this session's f16 cache would round them")
        arrays = [a.view(np.float16).astype(np.float32) for a in arrays]
    if not all(np.isfinite(a.view(np.float16) if a.dtype == np.uint16 else a).all() for a in arrays
               if a.dtype in (np.float32, np.uint16)):  # a quantized cell's scales: a NaN would stop the model
        raise _Unusable("it holds NaN or infinite values")
    return arrays[:n_layer], arrays[n_layer:]


def _parse_session(data, path: Path) -> tuple[str | None, list[dict], int, SamplingParams]:
    """A saved session's fields, each checked; a bad one is a LlambaError naming it."""
    def bad(field_name: str, why: str) -> LlambaError:
        return LlambaError(f"{path}: saved session field {field_name!r} {why}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LlambaError(f"{path}: not a saved llamba chat session")
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise bad("messages", "must be a list of {role, content} texts")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("system", "must be text or null")
    max_tokens = data.get("max_tokens", ChatSettings.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens", "must be a whole number >= 1")
    raw = data.get("sampling", {})
    if not isinstance(raw, dict):
        raise bad("sampling", "must be an object")
    fields = SamplingParams.__dataclass_fields__
    known = {k: v for k, v in raw.items() if k in fields and k != "logit_bias"}
    for key, value in known.items():
        kind = int if key == "seed" or type(fields[key].default) is int else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise bad(f"sampling.{key}", "must be a number")
    try:
        sampling = SamplingParams(**known).validate()
    except LlambaError as e:
        raise bad("sampling", f"is out of range: {e}") from None
    return system, [{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, sampling


def _kv_path(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".kv.npz")


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file and rename, so a failure never leaves half a file where a good one was."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
