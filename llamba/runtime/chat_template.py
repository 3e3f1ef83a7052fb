"""Chat templates: the model's own Jinja2 template in a sandbox, or a built-in style when it has none.

Rendering follows Hugging Face's conventions (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text), so templates written for transformers render the same.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LlambaError

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


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
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

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None,
               **extra: Any) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise LlambaError(f"message {i} needs a 'role' (and 'content'): {m!r}")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra,
            )
        except jinja2.TemplateError as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise LlambaError(f"chat template ({self.name}){_template_line(e)}: {type(e).__name__}: {e}") from None


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
            raise LlambaError(f"chat template {override!r}: no such file, and not a built-in style ({styles})")
        return ChatTemplate(path.read_text(encoding="utf-8"), path.name, bos, eos)
    source = metadata.get("tokenizer.chat_template")
    if source:
        return ChatTemplate(source, "model", bos, eos)
    style = guess_style(token_to_id, metadata.get("general.architecture"))
    return ChatTemplate(BUILTIN_TEMPLATES[style], style, bos, eos)
