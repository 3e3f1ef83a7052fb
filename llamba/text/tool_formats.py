"""Tool-call formats, one per model family, chosen from the chat template as llama.cpp's common/chat.cpp
chooses them (the first that fits):

- Hermes / Qwen2.5: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the template writes
  `<tool_call>`);
- Llama 3.x: the answer is `{"name": ..., "parameters": {...}}`, bare or after `<|python_tag|>` (the template
  has an `ipython` role); the turn ends with `<|eot_id|>` or `<|eom_id|>`, both end-of-generation tokens;
- Mistral Nemo: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "9 letters or digits"}]`;
- generic, for templates that know no tools: the tools are described in a system message and the whole answer
  is JSON, `{"tool_call": {"name", "arguments"}}` (`{"tool_calls": [...]}` with parallel calls) or
  `{"response": ...}`, as llama.cpp's generic format.

Each format says how its calls are written (a CallSyntax, which text/tools.py's ToolCallStream reads), the
grammar that constrains them (Lark over the tools' argument schemas, for llguidance), the trigger after which
that grammar starts under tool_choice auto (a lazy grammar), and how the prompt carries the tools.
"""

from __future__ import annotations

import datetime
import json
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Callable

from ..generation.constraints import JSON_OPTIONS, Constraint, Trigger

NAME = r'"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*'
ID = r'(?:\s*,\s*"id"\s*:\s*"[^"]*")?'
TYPED = r'(?:"type"\s*:\s*"function"\s*,\s*)?'


@dataclass(frozen=True)
class CallSyntax:
    """How a format writes its calls, as regular expressions (the `regex` module's, matched as text streams):
    opener starts a block of calls (searched anywhere, or from the answer's start when it begins with \\A);
    head runs from a call's start to its arguments' JSON value (group "name"); tail from the end of that value
    to the call's end; separator between calls in one block (None: one call a block); closer ends the block.
    holds_content: the answer's text is not streamed but unwrapped whole (the generic format's
    {"response": ...}); response: where an answer that is a response reaches its value (a string value is then
    streamed as the content, decoded); accepts_bare: an answer that is one bare or fenced JSON call counts
    too."""

    opener: str
    head: str
    tail: str
    separator: str | None = None
    closer: str = ""
    holds_content: bool = False
    response: str | None = None
    accepts_bare: bool = False


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool calls. shape, how the grammar lays the calls out: "blocks" (each call between
    opener_text and closer_text, as many as allowed), "object" (the answer is one JSON call, Llama's, which may
    begin with "type": "function"), "array" (opener_text, then one JSON array of calls with ids, Mistral's) or
    "answer" (the whole answer is JSON: the calls or a response; the tools are described in the prompt)."""

    name: str
    syntax: CallSyntax
    shape: str
    arguments_key: str = "arguments"  # the key the call's arguments are under in the model's JSON
    opener_text: str | None = None  # the literal that opens the calls in the grammar
    closer_text: str | None = None  # and that closes each call (Hermes' </tool_call>)
    trigger: Trigger | None = None  # None: the grammar runs from the first token, also under auto
    variables: Callable[[], dict] = dict  # what else the template reads
    call_id: Callable[[], str] = lambda: f"call_{uuid.uuid4().hex[:24]}"

    def grammar(self, tools: list[dict], parallel: bool, required: bool, answer: dict | None,
                special_id: Callable[[str], int | None]) -> Constraint:
        """The calls' grammar: of these tools (parallel: more than one call), and beside them, unless a call is
        required, an answer following the schema `answer` (response_format with tools). special_id: the id of
        the special token a marker is in this vocabulary, or None (the marker is then text)."""
        if self.shape == "answer":
            return Constraint("lark", f"start: %json {_dumps(_generic_schema(tools, parallel, required, answer))}")
        rules = [f"start: {'calls' if required or answer is None else 'calls | answer'}",
                 *self._calls_rules(tools, parallel, special_id)]
        if answer is not None and not required:
            rules.append(f"answer: %json {_dumps(answer)}")
        return Constraint("lark", "\n".join(rules))

    def _calls_rules(self, tools: list[dict], parallel: bool, special_id) -> list[str]:
        if self.shape == "array":
            nine = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
            items = _any_of([_call_object(t, self.arguments_key, nine) for t in tools])
            array = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return [f"calls: {_marker(self.opener_text, special_id)} %json {_dumps(array)}"]
        schema = _any_of([_call_object(t, self.arguments_key) for t in tools], typed=self.shape == "object")
        if self.shape == "object":  # Llama 3 writes one call a turn
            return [f"calls: %json {_dumps(schema)}"]
        open_, close = _marker(self.opener_text, special_id), _marker(self.closer_text, special_id)
        return [f"calls: call {'more*' if parallel else ''}", 'more: "\\n" call',
                f'call: {open_} "\\n" %json {_dumps(schema)} "\\n" {close}']

    def prompt_messages(self, messages: list[dict], tools: list[dict] | None, template_source: str) -> list[dict]:
        """The messages as this format's template should see them: for the generic format, the tools and the
        answer's JSON shape in a system message, earlier calls and results written as that JSON."""
        if self.shape != "answer" or not tools:
            return messages
        return generic_messages(messages, tools, "tools" in template_source)


def _dumps(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _marker(text: str, special_id) -> str:
    token = special_id(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _call_object(tool: dict, arguments_key: str, id_schema: dict | None = None) -> dict:
    function = tool["function"]
    properties = {"name": {"const": function["name"]},
                  arguments_key: function.get("parameters") or {"type": "object"}}
    if id_schema is not None:
        properties["id"] = id_schema
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _any_of(options: list[dict], typed: bool = False) -> dict:
    if typed:  # Llama 3.x may write "type": "function" first, as llama.cpp's grammar allows
        options = [{**o, "properties": {"type": {"const": "function"}, **o["properties"]}} for o in options]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _generic_schema(tools: list[dict], parallel: bool, required: bool, answer: dict | None) -> dict:
    one = _any_of([_call_object(t, "arguments") for t in tools])
    if parallel:
        calls = {"type": "object", "required": ["tool_calls"], "additionalProperties": False,
                 "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}}}
    else:
        calls = {"type": "object", "required": ["tool_call"], "additionalProperties": False,
                 "properties": {"tool_call": one}}
    if required:
        return calls
    response = {"type": "object", "required": ["response"], "additionalProperties": False,
                "properties": {"response": answer or {"type": "string"}}}
    return {"anyOf": [calls, response]}


def _llama3_variables() -> dict:
    """What llama.cpp gives Llama 3.x's template: today's date, and the tools in the system message."""
    return {"date_string": datetime.date.today().strftime("%d %b %Y"), "tools_in_user_message": False}


def _nemo_id() -> str:
    """Mistral Nemo's template refuses any call id but 9 letters and digits."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


HERMES = ToolFormat(
    "hermes", CallSyntax(r"<tool_call>", r"\s*\{\s*" + NAME + r'"arguments"\s*:\s*', r"\s*\}\s*</tool_call>",
                         accepts_bare=True),
    "blocks", opener_text="<tool_call>", closer_text="</tool_call>", trigger=Trigger(r"(<tool_call>)"))
LLAMA3 = ToolFormat(
    "llama3", CallSyntax(r"\A", r'\s*(?:<\|python_tag\|>)?\s*\{\s*' + TYPED + NAME + r'"parameters"\s*:\s*',
                         r"\s*\}"),
    "object", arguments_key="parameters", variables=_llama3_variables,
    trigger=Trigger(r'\s*(?:<\|python_tag\|>\s*)?(\{\s*' + TYPED + r'"name"\s*:\s*")', at_start=True))
# [TOOL_CALLS] is a control token in Nemo's vocabulary, which the answer's text leaves out: a bare array of
# calls at the answer's start is taken too
MISTRAL_NEMO = ToolFormat(
    "mistral-nemo", CallSyntax(r'(?:\[TOOL_CALLS\]|\A(?=\s*\[\s*\{\s*"name"))\s*\[',
                               r"\s*\{\s*" + NAME + r'"arguments"\s*:\s*', ID + r"\s*\}", r"\s*,", r"\s*\]"),
    "array", opener_text="[TOOL_CALLS]", trigger=Trigger(r"(\[TOOL_CALLS\])"), call_id=_nemo_id)
GENERIC = ToolFormat(
    "generic", CallSyntax(r'\A\s*\{\s*(?:"tool_call"\s*:|"tool_calls"\s*:\s*\[)',
                          r"\s*\{\s*" + NAME + r'"arguments"\s*:\s*', ID + r"\s*\}", r"\s*,", r"\s*\]?\s*\}",
                          holds_content=True, response=r'\A\s*\{\s*"response"\s*:\s*'),
    "answer")


def detect_format(template_source: str) -> ToolFormat:
    """The format a chat template writes tool calls in, recognised by what it writes (as llama.cpp does)."""
    if "<tool_call>" in template_source:
        return HERMES
    if "<|start_header_id|>ipython<|end_header_id|>" in template_source:
        return LLAMA3
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL_NEMO
    return GENERIC


GENERIC_INSTRUCTIONS = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with "
                        "`response` reply to the user's request")


def generic_messages(messages: list[dict], tools: list[dict], template_has_tools: bool) -> list[dict]:
    """Messages for a template without tool calls: the tools (unless the template lists them itself) and the
    answer's shape in the system message; an assistant's calls as the JSON it would write; a tool's result as
    a user message holding {"tool_response": ...}, which any template renders."""
    system = GENERIC_INSTRUCTIONS
    if not template_has_tools:
        listing = json.dumps([t["function"] for t in tools], indent=2, ensure_ascii=False)
        system = f"You can call any of the following tools to satisfy the user's requests: {listing}\n\n{system}"
    out = []
    for m in messages:
        if m.get("role") == "system" and not out:
            system = f"{m.get('content') or ''}\n\n{system}".lstrip()
            continue
        if m.get("tool_calls"):
            m = {"role": "assistant", "content": json.dumps(_generic_calls(m["tool_calls"]), ensure_ascii=False)}
        elif m.get("role") == "tool":
            response = {"tool_call_id": m.get("tool_call_id"), "content": m.get("content")}
            m = {"role": "user", "content": json.dumps({"tool_response": response}, ensure_ascii=False)}
        out.append(m)
    return [{"role": "system", "content": system}, *out]


def _generic_calls(calls: list[dict]) -> dict:
    written = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments"), "id": c.get("id")}
               for c in calls]
    return {"tool_call": written[0]} if len(written) == 1 else {"tool_calls": written}


def unwrap_generic(text: str) -> str:
    """The content of a generic-format answer: its {"response": ...} (a string as itself, else as JSON text),
    or the text as it is when it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text
    if not isinstance(data, dict) or set(data) != {"response"}:
        return text
    response = data["response"]
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
