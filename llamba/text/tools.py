"""Tool calls in OpenAI's shapes, in the Qwen2.5 / Hermes format: `<tool_call>{"name", "arguments"}</tool_call>`.

A chat request's `tools`, `tool_choice` and `response_format` become one ChatPlan: the tools the chat template
renders (the model's own template writes the tool descriptions, assistant calls and `role: tool` results), and
the constraint on the answer:

- `auto`: the model writes freely; once it writes the `<tool_call>` token (the trigger) the call is constrained to
  `{"name": one of the tools, "arguments": that tool's parameter schema}` and its `</tool_call>` (a lazy
  grammar, as llama.cpp's), then more calls or the end;
- `required` or a named function: the answer is calls from its first token (of any tool, or of that one);
- `none`: no tools in the prompt, free text.

The answer's text is then split into content and tool calls (`split_tool_calls`), or, streaming, into OpenAI's
deltas as it comes (`ToolCallStream`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from ..errors import BadRequestError
from ..generation.constraints import JSON_OPTIONS, Constraint
from .openai import response_format_constraint
from .stream import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ChatPlan:
    """How one chat request is rendered and constrained."""

    tools: list[dict] | None = None  # for the chat template (None: no tools in the prompt)
    constraint: Constraint | None = None
    trigger: str | None = None  # the constraint starts after this special token (None: from the first token)
    parses_calls: bool = False  # whether the answer's <tool_call> blocks become tool_calls

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or []}

    def split(self, text: str) -> tuple[str | None, list[dict]]:
        """A whole answer's content and its tool calls in OpenAI's shape."""
        if not self.parses_calls:
            return text, []
        content, calls = split_tool_calls(text, self.tool_names)
        return content, [call.openai() for call in calls]

    def deltas(self) -> "ToolCallStream | PlainDeltas":
        """What turns a streamed answer's text into OpenAI's deltas."""
        return ToolCallStream(self.tool_names) if self.parses_calls else PlainDeltas()


def plan_chat(tools: list | None = None, tool_choice: str | dict | None = None, response_format: dict | None = None,
              parallel_tool_calls: bool = False, has_trigger_token: bool = True) -> ChatPlan:
    """The plan for a request's tools, tool_choice and response_format (OpenAI's shapes); a bad value is a
    BadRequestError. has_trigger_token: the vocabulary has <tool_call> as one special token (see
    trigger_is_token; else under auto the calls are parsed but not constrained: there is no token to wait for).
    With tools in play, response_format is not applied: the answer is calls or free text. Parallel calls are
    off unless asked for, as in llama-server (a small model allowed more calls tends to repeat its first)."""
    tools = check_tools(tools)
    choice = _choice(tool_choice, tools)
    if not tools or choice == "none":
        return ChatPlan(constraint=response_format_constraint(response_format))
    chosen = [t for t in tools if t["function"]["name"] == choice] if choice not in ("auto", "required") else tools
    if choice == "auto":
        if not has_trigger_token:
            return ChatPlan(tools=tools, parses_calls=True)
        return ChatPlan(tools, _calls_grammar(chosen, parallel_tool_calls, True, lazy=True), OPEN, True)
    return ChatPlan(tools, _calls_grammar(chosen, parallel_tool_calls, has_trigger_token, lazy=False), None, True)


def trigger_is_token(tokenizer) -> bool:
    """Whether the vocabulary writes <tool_call> as one special token (Qwen2.5's does)."""
    token = tokenizer.token_to_id.get(OPEN)
    return token is not None and tokenizer.is_special(token) and CLOSE in tokenizer.token_to_id


def check_tools(tools: list | None) -> list[dict]:
    """The tools, each {"type": "function", "function": {"name", "description"?, "parameters"?}}, checked."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequestError("tools must be a list")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise BadRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequestError(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(function.get("parameters", {}), dict):
            raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def _choice(tool_choice, tools: list[dict]) -> str:
    """"auto", "none", "required" or a function's name."""
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise BadRequestError(f"tool_choice must be auto, none, required or a function (got {tool_choice!r})")
        if tool_choice == "required" and not tools:
            raise BadRequestError("tool_choice is required but no tools were given")
        return tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise BadRequestError('tool_choice must be {"type": "function", "function": {"name": ...}}')
    if name not in {t["function"]["name"] for t in tools}:
        raise BadRequestError(f"tool_choice names the function {name!r}, which is not among the tools")
    return name


def call_schema(tools: list[dict]) -> dict:
    """The JSON of one call: {"name": a tool's name, "arguments": that tool's parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 "arguments": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_OPTIONS}


def _calls_grammar(tools: list[dict], parallel: bool, as_tokens: bool, lazy: bool) -> Constraint:
    """Lark for the calls: `<tool_call>\\n{json}\\n</tool_call>`, repeated when parallel calls are allowed;
    as_tokens: the markers are special tokens (Lark's <name>), else text; lazy: without the first <tool_call>,
    which the model writes before the grammar starts."""
    open_, close = (OPEN, CLOSE) if as_tokens else (json.dumps(OPEN), json.dumps(CLOSE))
    rules = [f"start: {'body' if lazy else 'call'} {'more*' if parallel else ''}",
             'more: "\\n" call', f"call: {open_} body",
             f'body: "\\n" %json {json.dumps(call_schema(tools))} "\\n" {close}']
    return Constraint("lark", "\n".join(rules))


# ----------------------------------------------------------------------------------------- the answer

@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_call(text: str) -> ToolCall | None:
    """The call a <tool_call> block holds ({"name", "arguments"}), or None when it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(data["name"], arguments)


def split_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer: every complete <tool_call> block that parses becomes a call (and a
    bare call of one of tool_names, see ToolCallStream), the rest of the text the content (None when only calls
    remain)."""
    stream = ToolCallStream(tool_names)
    pieces = stream.feed(text) + stream.flush()
    content = "".join(p["content"] for p in pieces if "content" in p)
    calls = stream.calls
    if calls:
        content = content.strip() or None
    return content, calls


class ToolCallStream:
    """Text in, OpenAI deltas out: {"content": ...} pieces, and for each complete call two tool_calls deltas
    (its index, id and name with empty arguments, then the arguments), as OpenAI streams them. Text that might
    be the start of <tool_call> is held back until it is known not to be.

    tool_names: also take an answer that is nothing but one call of these tools as bare JSON, or in a ```json
    fence (how Qwen2.5-Coder often answers, unconstrained, under tool_choice auto; llama.cpp accepts it too):
    such an answer is held back until it ends."""

    def __init__(self, tool_names: set[str] | None = None):
        self.calls: list[ToolCall] = []
        self._held = ""
        self._in_call = False
        self._tool_names = tool_names or set()
        self._maybe_bare = bool(tool_names)  # the answer so far could still be a bare call

    def feed(self, text: str) -> list[dict]:
        self._held += text
        if self._maybe_bare:
            start = self._held.lstrip()
            if start[:1] == "{" or (start.startswith("```json") or "```json".startswith(start)):
                return []
            self._maybe_bare = False
        return self._scan()

    def _scan(self) -> list[dict]:
        out: list[dict] = []
        while True:
            if self._in_call:
                end = self._held.find(CLOSE)
                if end < 0:
                    return out
                body, self._held, self._in_call = self._held[:end], self._held[end + len(CLOSE):], False
                out += self._call_deltas(body)
                continue
            start = self._held.find(OPEN)
            if start < 0:
                keep = partial_suffix(self._held, OPEN)
                ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep:]
                if ready:
                    out.append({"content": ready})
                return out
            if start:
                out.append({"content": self._held[:start]})
            self._held, self._in_call = self._held[start + len(OPEN):], True

    def flush(self) -> list[dict]:
        """At the end: anything held back is content (an unfinished call included: it is no call)."""
        if self._maybe_bare:
            self._maybe_bare = False
            call = _bare_call(self._held, self._tool_names)
            if call is not None:
                self._held = ""
                return self._deltas(call)
            return self._scan() + self.flush()
        rest = (OPEN if self._in_call else "") + self._held
        self._held, self._in_call = "", False
        return [{"content": rest}] if rest else []

    def _call_deltas(self, body: str) -> list[dict]:
        call = parse_call(body.strip())
        if call is None:  # not a call after all: the text stays content
            return [{"content": OPEN + body + CLOSE}]
        return self._deltas(call)

    def _deltas(self, call: ToolCall) -> list[dict]:
        index = len(self.calls)
        self.calls.append(call)
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def _bare_call(text: str, tool_names: set[str]) -> ToolCall | None:
    """A whole answer that is one call of a known tool, as bare JSON or in a ```json fence."""
    text = text.strip()
    if text.startswith("```json") and text.endswith("```"):
        text = text[len("```json"):-3].strip()
    call = parse_call(text)
    if call is None or call.name not in tool_names or '"arguments"' not in text:
        return None
    return call


class PlainDeltas:
    """ToolCallStream's interface for an answer without tools: every piece of text is content."""

    calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def flush(self) -> list[dict]:
        return []


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant call's arguments as an object, not JSON text (what
    OpenAI clients send), so the template writes {"city": "Paris"}, not a quoted string (llama.cpp does this
    too)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_with_object_arguments(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _with_object_arguments(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {**call, "function": {**function, "arguments": arguments}}
