"""Tool calls in OpenAI's shapes, in the format the model's chat template writes (text/tool_formats.py: Hermes /
Qwen2.5 `<tool_call>`, Llama 3.x JSON, Mistral Nemo `[TOOL_CALLS]`, or a generic JSON answer).

A chat request's `tools`, `tool_choice` and `response_format` become one ChatPlan: the tools the chat template
renders (the model's own template writes the tool descriptions, assistant calls and `role: tool` results), and
the constraint on the answer:

- `auto`: the model writes freely; once it writes the format's trigger (`<tool_call>`, `[TOOL_CALLS]`, a
  `{"name": "` that opens the answer) the call is constrained to the declared tools' names and argument schemas
  (a lazy grammar, as llama.cpp's), then more calls or the end. The generic format has no trigger: its whole
  answer is JSON, a call or a response, from the first token;
- `required` or a named function: the answer is calls from its first token (of any tool, or of that one);
- `none`: no tools in the prompt, free text (or response_format's JSON).

With tools and response_format together the answer is a call or JSON that follows the response schema (what
OpenAI does): the grammar allows either from the first token, so it is not lazy.

The answer's text is then split into content and tool calls (`ChatPlan.split`), or, streaming, into OpenAI's
deltas as it comes (`ToolCallStream`): a call's id and name once its name is written, then its arguments in
fragments as they form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import regex

from ..errors import BadRequestError
from ..generation.constraints import Constraint, Trigger
from .openai import response_format_schema
from .tool_formats import HERMES, ToolFormat, unwrap_generic


@dataclass
class ChatPlan:
    """How one chat request is rendered and constrained."""

    tools: list[dict] | None = None  # for the chat template (None: no tools in the prompt)
    constraint: Constraint | None = None
    trigger: Trigger | None = None  # the constraint starts at this trigger (None: from the first token)
    format: ToolFormat | None = None  # how the answer writes calls (None: it has none to parse)

    @property
    def tool_names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools or []}

    def split(self, text: str) -> tuple[str | None, list[dict]]:
        """A whole answer's content and its tool calls in OpenAI's shape."""
        if self.format is None:
            return text, []
        content, calls = split_tool_calls(text, self.tool_names, self.format)
        return content, [call.openai() for call in calls]

    def deltas(self) -> "ToolCallStream | PlainDeltas":
        """What turns a streamed answer's text into OpenAI's deltas."""
        return ToolCallStream(self.tool_names, self.format) if self.format is not None else PlainDeltas()

    def prompt_messages(self, messages: list[dict], template_source: str) -> list[dict]:
        """The messages as the template should see them (arguments as objects; the generic format's system
        message)."""
        messages = template_messages(messages)
        return self.format.prompt_messages(messages, self.tools, template_source) if self.format else messages

    @property
    def template_variables(self) -> dict:
        return self.format.variables() if self.format and self.tools else {}


def plan_chat(tools: list | None = None, tool_choice: str | dict | None = None, response_format: dict | None = None,
              parallel_tool_calls: bool = False, tool_format: ToolFormat = HERMES,
              special_id: Callable[[str], int | None] = lambda text: None) -> ChatPlan:
    """The plan for a request's tools, tool_choice and response_format (OpenAI's shapes); a bad value is a
    BadRequestError. tool_format: how the model writes calls (tool_formats.detect_format reads it from the
    template); special_id: the id of the special token a marker like <tool_call> is, or None where it is text.
    Parallel calls are off unless asked for, as in llama-server (a small model allowed more calls tends to repeat
    its first)."""
    tools = check_tools(tools)
    choice = _choice(tool_choice, tools)
    answer = response_format_schema(response_format)
    if not tools or choice == "none":
        return ChatPlan(constraint=Constraint.json_schema(answer) if answer is not None else None)
    chosen = [t for t in tools if t["function"]["name"] == choice] if choice not in ("auto", "required") else tools
    required = choice != "auto"
    constraint = tool_format.grammar(chosen, parallel_tool_calls, required, answer, special_id)
    lazy = not required and answer is None
    return ChatPlan(tools, constraint, tool_format.trigger if lazy else None, tool_format)


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


# ----------------------------------------------------------------------------------------- the answer

@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=HERMES.call_id)

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_call(text: str) -> ToolCall | None:
    """The call a JSON text holds ({"name", "arguments"} or Llama's "parameters"), or None when it is not one."""
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


def split_tool_calls(text: str, tool_names: set[str] | None = None,
                     tool_format: ToolFormat = HERMES) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer, read as ToolCallStream reads it streamed (content None when only
    calls remain)."""
    stream = ToolCallStream(tool_names, tool_format)
    pieces = stream.feed(text) + stream.flush()
    content = "".join(p["content"] for p in pieces if "content" in p)
    calls = stream.calls
    if calls:
        content = content.strip() or None
    return content, calls


class ToolCallStream:
    """Text in, OpenAI deltas out: {"content": ...} pieces, and for each call a tool_calls delta with its index,
    id, type and name (arguments "") as soon as its name is written, then its arguments as fragments while they
    form, as OpenAI streams them. Text that might be the start of a call is held back until it is known not to
    be; a block that turns out to be no call is content.

    It reads the format's CallSyntax as a small machine over the answer's text: "text" (looking for the opener),
    "head" (a call's start, up to its arguments), "arguments" (a JSON value, streamed), "tail" (the call's end),
    "after" (another call of the block, or its end); and for the generic format "response" (a response's
    string, streamed as content) and "done".

    tool_names: for formats that accept it, also take an answer that is nothing but one call of these tools as
    bare JSON, or in a ```json fence (how Qwen2.5-Coder often answers, unconstrained, under tool_choice auto;
    llama.cpp accepts it too): such an answer is held back until it ends."""

    def __init__(self, tool_names: set[str] | None = None, tool_format: ToolFormat = HERMES):
        self.calls: list[ToolCall] = []
        self._format = tool_format
        syntax = tool_format.syntax
        self._opener, self._head, self._tail = (regex.compile(p) for p in (syntax.opener, syntax.head, syntax.tail))
        self._separator = regex.compile(syntax.separator) if syntax.separator else None
        self._closer = regex.compile(syntax.closer)
        self._response = regex.compile(syntax.response) if syntax.response else None
        self._text = ""  # the answer so far
        self._pos = 0  # how far it has been read
        self._state = "text"
        self._block = -1  # where the block of calls being read began (its text is content if it is no call)
        self._failed = -1  # where a block that was no call began (its opener is not looked for there again)
        self._value: _JsonValue | None = None
        self._held: list[str] = []  # content, for a format whose content is unwrapped at the end
        self._tool_names = tool_names or set()
        self._maybe_bare = syntax.accepts_bare and bool(tool_names)  # the answer so far could be a bare call

    def feed(self, text: str) -> list[dict]:
        self._text += text
        if self._maybe_bare:
            start = self._text.lstrip()
            if start[:1] == "{" or (start.startswith("```json") or "```json".startswith(start)):
                return []
            self._maybe_bare = False
        return self._scan()

    def flush(self) -> list[dict]:
        """At the end: anything held back is content (a block that never became a call included); a call cut
        in its arguments stays a call, its arguments as far as they came."""
        if self._maybe_bare:
            self._maybe_bare = False
            call = _bare_call(self._text, self._tool_names)
            if call is not None:
                self._text, self._pos = "", 0
                return self._head_delta(call) + self._arguments_delta(call.arguments)
            return self._scan() + self.flush()
        if self._state == "head":
            self._state, self._pos = "text", self._block
        out = self._content(self._text[self._pos:]) if self._state == "text" else []
        self._pos = len(self._text)
        if self._held:
            out.append({"content": unwrap_generic("".join(self._held))})
            self._held = []
        return out

    def _scan(self) -> list[dict]:
        out: list[dict] = []
        while True:
            step = getattr(self, f"_read_{self._state}")()
            if step is None:
                return out
            out += step

    def _read_text(self) -> list[dict] | None:
        if self._response is not None and self._pos == 0:
            m = self._response.match(self._text, 0, partial=True)
            if m is not None and (m.partial or m.end() == len(self._text)):
                return None  # wait: the answer may be a response, its value not yet begun
            if m is not None and self._text[m.end()] == '"':
                self._pos, self._state = m.end() + 1, "response"
                return []
            self._response = None  # not a response with a string value: read (and hold) as any other text
        m = self._opener.search(self._text, self._pos, partial=True)
        if m is not None and m.start() == self._failed:  # that block was no call: look past its opener
            m = self._opener.search(self._text, self._failed + 1, partial=True)
        if m is None or m.partial:
            end = len(self._text) if m is None else m.start()
            out, self._pos = self._content(self._text[self._pos:end]), end
            return out or None
        out = self._content(self._text[self._pos:m.start()])
        self._block, self._pos, self._state = m.start(), m.end(), "head"
        return out

    def _read_head(self) -> list[dict] | None:
        m = self._head.match(self._text, self._pos, partial=True)
        if m is None:  # not a call: the block's text is content
            self._failed, self._pos, self._state = self._block, self._block, "text"
            return []
        if m.partial:
            return None
        call = ToolCall(m["name"], "", self._format.call_id())
        self._pos, self._state, self._value = m.end(), "arguments", _JsonValue()
        return self._head_delta(call)

    def _read_response(self) -> list[dict] | None:
        """A response's string value, streamed as content as far as it decodes (never half an escape)."""
        end, done = _string_end(self._text, self._pos)
        piece = _decoded(self._text[self._pos:end])
        self._pos, self._state = end + done, "done" if done else "response"
        return [{"content": piece}] if piece else ([] if done else None)

    def _read_done(self) -> None:
        """After a response: the rest closes its JSON."""
        self._pos = len(self._text)
        return None

    def _read_arguments(self) -> list[dict] | None:
        if not self._value.started:  # the whitespace before the value is not part of the arguments
            while self._pos < len(self._text) and self._text[self._pos].isspace():
                self._pos += 1
            if self._pos == len(self._text):
                return None
            self._value.started = True
        end, done = self._value.feed(self._text, self._pos)
        fragment, self._pos = self._text[self._pos:end], end
        if done:
            self._state = "tail"
        if fragment:
            self.calls[-1].arguments += fragment
            return self._arguments_delta(fragment)
        return [] if done else None

    def _read_tail(self) -> list[dict] | None:
        m = self._tail.match(self._text, self._pos, partial=True)
        if m is not None and m.partial:
            return None
        self._pos, self._state = (m.end(), "after") if m is not None else (self._pos, "text")
        return []

    def _read_after(self) -> list[dict] | None:
        more = self._separator.match(self._text, self._pos, partial=True) if self._separator else None
        end = self._closer.match(self._text, self._pos, partial=True)
        if (more is not None and more.partial) or (end is not None and end.partial):
            return None
        if more is not None:
            self._pos, self._state = more.end(), "head"
        else:
            self._pos, self._state = (end.end() if end is not None else self._pos), "text"
        return []

    def _content(self, text: str) -> list[dict]:
        if not text:
            return []
        if self._format.syntax.holds_content:
            self._held.append(text)
            return []
        return [{"content": text}]

    def _head_delta(self, call: ToolCall) -> list[dict]:
        self.calls.append(call)
        head = {"index": len(self.calls) - 1, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        return [{"tool_calls": [head]}]

    def _arguments_delta(self, fragment: str) -> list[dict]:
        return [{"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": fragment}}]}]


def _decoded(escaped: str) -> str:
    """A piece of a JSON string's inside, decoded."""
    return json.loads(f'"{escaped}"') if escaped else ""


class _JsonValue:
    """Where a JSON value written as text ends, found a piece of text at a time: strings (with their escapes)
    and nesting are followed; a bare scalar ends where its container goes on."""

    def __init__(self):
        self.started = False
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str, pos: int) -> tuple[int, bool]:
        """(how far text is read, whether the value ended there)."""
        for i in range(pos, len(text)):
            c = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1, True
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]" or (self.depth == 0 and (c == "," or c.isspace())):
                if self.depth == 0:
                    return i, True
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
        return len(text), False


def _string_end(text: str, pos: int) -> tuple[int, bool]:
    """Inside a JSON string from pos: (where its text so far ends whole, never within an escape or between the
    halves of a surrogate pair; whether its closing quote is there)."""
    i = pos
    while i < len(text):
        if text[i] == '"':
            return i, True
        if text[i] == "\\":
            end = _escape_end(text, i + 1)
            if end < 0:
                return i, False
            i = end
        else:
            i += 1
    return i, False


def _escape_end(text: str, at: int) -> int:
    """Where the escape whose letter is at text[at] ends, -1 while it is not whole (a \\u escape of a high
    surrogate waits for its low half)."""
    if at >= len(text):
        return -1
    if text[at] != "u":
        return at + 1
    if at + 5 > len(text):
        return -1
    if not 0xD800 <= int(text[at + 1:at + 5], 16) < 0xDC00:
        return at + 5
    return at + 11 if at + 11 <= len(text) else -1


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
