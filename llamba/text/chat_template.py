"""Chat templates: the model's own Jinja2 template in a sandbox, or a built-in style when it has none.

Rendering follows Hugging Face's conventions (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text), so templates written for transformers render the same.
"""

from __future__ import annotations

import datetime
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LlambaError, NotFoundError

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% endif %}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
}


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


MAX_RENDER_SECONDS = 2.0  # real templates render in about a millisecond
MAX_TEXT = 4_000_000  # characters (or items) of any value or output a template may build


class _TemplateRunaway(Exception):
    """A template past its time or size bound (raised inside the render, reported as LlambaError)."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators that can build huge values in one step ('x' * 10**10) bounded."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 4096:
                raise _TemplateRunaway(f"the number {left} ** {right} is too large")
        if operator == "*" and _size(left) * _size(right) > MAX_TEXT:
            raise _TemplateRunaway("a repeated value grows past the size limit")
        if operator == "+" and _size(left) + _size(right) > MAX_TEXT:
            raise _TemplateRunaway("a value grows past the size limit")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, *args, **kwargs) -> Any:
        _check_sizes(args, kwargs)  # 'x'.center(10**9) and the like
        return super().call(context, obj, *args, **kwargs)


def _check_sizes(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEXT:
            raise _TemplateRunaway(f"the argument {value} is past the size limit")


def _bounded_filter(fn):
    """A filter whose numeric arguments are bounded ('x'|center(10**9))."""
    @functools.wraps(fn)  # keeps jinja's pass_context / pass_eval_ctx marks
    def bounded(*args, **kwargs):
        _check_sizes(args[1:], kwargs)
        return fn(*args, **kwargs)

    return bounded


def _bounded_join(seq) -> str:
    """Jinja's `~` operator (its compiled templates call `str_join`), with the size bound."""
    text = "".join(map(str, seq))
    if len(text) > MAX_TEXT:
        raise _TemplateRunaway("a joined value grows past the size limit")
    return text


def _size(value: Any) -> int:
    """A value's length when it is a sequence, else how many times it repeats one (an int), else 1."""
    if isinstance(value, (str, list, tuple)):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return max(abs(value), 1)
    return 1


class _Deadline:
    """While active, stops a render that runs past its time: a trace function checks the clock on the
    template's own lines (the compiled template is Python code named '<template>'), so empty loops stop too."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> "_Deadline":
        self._until = time.monotonic() + self.seconds
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self._previous)

    def _on_call(self, frame, event, arg):
        return self._on_line if frame.f_code.co_filename == "<template>" else None

    def _on_line(self, frame, event, arg):
        if time.monotonic() > self._until:
            raise _TemplateRunaway(f"rendering took longer than {self.seconds:g} s")
        return self._on_line


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters = {name: _bounded_filter(fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled template: `render(messages, add_generation_prompt=True)` gives the prompt text."""

    def __init__(self, source: str, name: str = "model", bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise LlambaError(f"chat template ({name}) line {e.lineno}: {e.message}") from None
        except (RecursionError, MemoryError, OverflowError) as e:
            raise LlambaError(f"chat template ({name}): cannot compile ({type(e).__name__})") from None
        # `~` compiles to a call of the module-level str_join: bound it too (the sandbox cannot intercept it)
        self._template.root_render_func.__globals__["str_join"] = _bounded_join

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               **extra: Any) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise LlambaError(f"message {i} needs a 'role' (and 'content'): {m!r}")
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        try:
            return self._bounded_render(variables)
        except _TemplateRunaway as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: runaway template: {e}") from None
        except (OverflowError, MemoryError, RecursionError) as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: runaway template: "
                              f"{type(e).__name__}: {e}") from None
        except jinja2.TemplateError as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: {type(e).__name__}: {e}") from None


    def _bounded_render(self, variables: dict) -> str:
        pieces, size = [], 0
        with _Deadline(MAX_RENDER_SECONDS):
            for piece in self._template.generate(**variables):
                size += len(piece)
                if size > MAX_TEXT:
                    raise _TemplateRunaway(f"the output passed {MAX_TEXT} characters")
                pieces.append(piece)
        return "".join(pieces)


def turn_terminator(template: "ChatTemplate") -> str:
    """The text a template writes right after an assistant message (e.g. '<|im_end|>'), '' if none."""
    marker = "\u2063llamba\u2063"
    try:
        text = template.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                               add_generation_prompt=False)
    except LlambaError:
        return ""
    at = text.find(marker)
    return text[at + len(marker):] if at >= 0 else ""


def _template_line(error: BaseException) -> str:
    """' line N' for the deepest frame of the error that lies in the template, if any."""
    line = getattr(error, "lineno", None)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" line {line}" if line else ""


def guess_style(token_to_id: dict[str, int], architecture: str | None) -> str:
    """The built-in style that fits a model without a template, judged by its vocabulary and family."""
    if "<start_of_turn>" in token_to_id or (architecture or "").startswith("gemma"):
        return "gemma"
    if "<|start_header_id|>" in token_to_id:
        return "llama3"
    if "<|im_start|>" in token_to_id:
        return "chatml"
    if "[INST]" in token_to_id:
        return "mistral"
    if architecture == "llama" and "<s>" in token_to_id:
        return "llama2"
    return "chatml"


def load_chat_template(metadata: dict, tokens: list[str], token_to_id: dict[str, int],
                       bos_id: int | None, eos_id: int | None, override: str | None = None) -> ChatTemplate:
    """The template to use: `override` (a built-in style name or a path to a template file), else the
    model's `tokenizer.chat_template`, else a built-in style guessed from the vocabulary."""
    bos = tokens[bos_id] if bos_id is not None else ""
    eos = tokens[eos_id] if eos_id is not None else ""
    if override:
        if override in BUILTIN_TEMPLATES:
            return ChatTemplate(BUILTIN_TEMPLATES[override], override, bos, eos)
        path = Path(override).expanduser()
        if not path.is_file():
            styles = ", ".join(BUILTIN_TEMPLATES)
            raise NotFoundError(f"chat template {override!r}: no such file, and not a built-in style ({styles})")
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), path.name, bos, eos)
        except UnicodeDecodeError:
            raise LlambaError(f"chat template {override!r}: not UTF-8 text") from None
        except OSError as e:
            raise LlambaError(f"chat template {override!r}: cannot read ({e.strerror})") from None
    source = metadata.get("tokenizer.chat_template")
    if source is not None and not isinstance(source, str):
        raise LlambaError("the model's tokenizer.chat_template is not a string")
    if source:
        return ChatTemplate(source, "model", bos, eos)
    style = guess_style(token_to_id, metadata.get("general.architecture"))
    return ChatTemplate(BUILTIN_TEMPLATES[style], style, bos, eos)
