"""A chat session: the conversation, its settings, and a KV cache reused across turns.

Each turn renders the whole conversation with the chat template; the Llama object evaluates only the tokens
after the prefix its cache already holds, so turn 2 costs its new tokens, not the history. When a turn would
not fit the context, the session either drops the oldest exchanges (keeping the system prompt) and says so,
or refuses with a clear error, by option.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .api import Llama
from .errors import LlambaError
from .runtime.generate import Step
from .runtime.sampling import SamplingParams

FORMAT = "llamba-chat-session/1"


@dataclass
class ChatSettings:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    overflow: str = "shift"  # shift | stop

    def set(self, key: str, value: str) -> None:
        """Set one setting from text, as the REPL's /set does; raises LlambaError on a bad key or value."""
        names = {"temp": "temperature", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repeat_penalty",
                 "repeat_last_n": "repeat_last_n", "seed": "seed", "max_tokens": "max_tokens"}
        name = names.get(key)
        if name is None:
            raise LlambaError(f"unknown setting {key!r} (settings: {', '.join(sorted(set(names) - {'temperature'}))})")
        try:
            parsed = int(value) if name in ("top_k", "repeat_last_n", "seed", "max_tokens") else float(value)
        except ValueError:
            raise LlambaError(f"{key} needs a number, not {value!r}") from None
        if name == "max_tokens":
            if parsed < 1:
                raise LlambaError("max_tokens must be >= 1")
            self.max_tokens = parsed
            return
        candidate = SamplingParams(**{**asdict(self.sampling), name: parsed})
        self.sampling = candidate.validate()


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
            for step in self.llm.stream_tokens(ids, max_tokens=s.max_tokens, **asdict(s.sampling)):
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
                raise LlambaError(f"the conversation ({len(ids)} tokens) no longer fits the context of "
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
        """Write the conversation and settings as JSON; with_kv also writes the KV cache beside it."""
        path = Path(path).expanduser()
        data = {"format": FORMAT, "model": str(self.llm.model_path), "system": self.system,
                "messages": self.messages, "max_tokens": self.settings.max_tokens,
                "sampling": asdict(self.settings.sampling)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)  # never leave a half-written session where a good one was
            if with_kv:
                self._save_kv(path.with_suffix(path.suffix + ".kv.npz"))
        except OSError as e:
            raise LlambaError(f"{path}: cannot save ({e.strerror})") from None
        return path

    def _save_kv(self, path: Path) -> None:
        keys, values = self.llm.cache.read_seq(0)
        n = keys[0].shape[1]
        arrays = {f"k{i}": k for i, k in enumerate(keys)} | {f"v{i}": v for i, v in enumerate(values)}
        np.savez(path, tokens=np.asarray(self.llm._tokens[:n], dtype=np.int64), **arrays)

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one (and its KV cache, when saved with it)."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise LlambaError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlambaError(f"{path}: not a saved llamba chat session") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("messages"), list):
            raise LlambaError(f"{path}: not a saved llamba chat session")
        sampling = SamplingParams(**{k: v for k, v in data.get("sampling", {}).items()
                                     if k in SamplingParams.__dataclass_fields__}).validate()
        self.settings.sampling = sampling
        self.settings.max_tokens = int(data.get("max_tokens", self.settings.max_tokens))
        self.system = data.get("system")
        self.messages = [m for m in data["messages"] if isinstance(m, dict) and "role" in m and "content" in m]
        self.llm.reset()
        kv_path = path.with_suffix(path.suffix + ".kv.npz")
        if kv_path.is_file():
            self._load_kv(kv_path)

    def _load_kv(self, path: Path) -> None:
        cache = self.llm.cache
        with np.load(path) as kv:
            tokens = kv["tokens"].tolist()
            if len(tokens) > cache.n_ctx or any(f"k{i}" not in kv for i in range(len(cache.k))):
                self.notify("the saved KV cache does not fit this model or context; it will be recomputed")
                return
            for i in range(len(cache.k)):
                if kv[f"k{i}"].shape != cache.k[i][:, : len(tokens)].shape:
                    self.notify("the saved KV cache does not fit this model; it will be recomputed")
                    return
            n = range(len(cache.k))
            cache.write_seq(0, [kv[f"k{i}"] for i in n], [kv[f"v{i}"] for i in n])
        self.llm._tokens = tokens
