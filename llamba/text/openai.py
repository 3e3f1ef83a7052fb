"""The OpenAI response shapes, built in one place for the Python API (api.py) and the server (server/app.py):
completions and chat completions, whole or as stream chunks, with usage and finish reasons; and the one
request shape both read the same way, response_format."""

from __future__ import annotations

import json
import time
import uuid

from ..errors import BadRequestError
from ..generation.constraints import Constraint


def response_meta(kind: str, model: str) -> dict:
    """id, created, model: the head every response and chunk of one answer shares (kind: cmpl, chatcmpl)."""
    return {"id": f"{kind}-{uuid.uuid4().hex[:16]}", "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """cached_tokens: prompt tokens whose keys and values were reused, not computed (OpenAI's details field)."""
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
              "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        counts["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return counts


def embeddings(model: str, vectors: list, prompt_tokens: int) -> dict:
    """An embeddings response: vectors as lists of floats, or base64 strings of their float32 bytes."""
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def openai_finish_reason(reason: str | None) -> str:
    """OpenAI's word for why an answer ended: running out of context is "length" there too."""
    return "length" if reason in ("length", "context") else reason or "stop"


def completion(meta: dict, text: str, finish_reason: str, usage: dict, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}


def completion_chunk(meta: dict, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "text_completion", "choices": [choice]}


def chat_completion(meta: dict, text: str | None, finish_reason: str, usage: dict, logprobs: dict | None = None,
                    tool_calls: list[dict] | None = None) -> dict:
    """A whole chat answer; with tool_calls (OpenAI's [{"id", "type", "function": {"name", "arguments"}}]) the
    message carries them and the finish reason is "tool_calls"."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "finish_reason": chat_finish_reason(finish_reason, bool(tool_calls)),
              "logprobs": logprobs}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}


def chat_finish_reason(finish_reason: str, called_tools: bool) -> str:
    """An answer that ended by itself after tool calls finished for "tool_calls" (a cut one stays "length")."""
    return "tool_calls" if called_tools and finish_reason == "stop" else finish_reason


def chat_chunk(meta: dict, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    """One chunk of a streamed chat answer: the first's delta names the role (the server adds OpenAI's
    "content": "", the API keeps llama-cpp-python's bare role), then {"content": text} pieces, the last an empty
    delta with the finish reason."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "chat.completion.chunk", "choices": [choice]}


def usage_chunk(meta: dict, object_name: str, usage: dict) -> dict:
    """The last chunk of a stream when the client asked for usage (stream_options.include_usage)."""
    return {**meta, "object": object_name, "choices": [], "usage": usage}



def response_format_schema(response_format: dict | None) -> dict | None:
    """The JSON schema a request's response_format asks for: {"type": "json_object"} (any object;
    llama-cpp-python's optional "schema" beside it), {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}, or {"type": "text"} / None (free text: None). Anything else is a BadRequestError."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _schema_object(response_format.get("schema"))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, str)):
            raise BadRequestError('response_format.json_schema must be {"name": ..., "schema": {...}}')
        return _schema_object(spec.get("schema"))
    raise BadRequestError(f"response_format.type must be text, json_object or json_schema (got {kind!r})")


def _schema_object(schema) -> dict:
    """A schema given as a dict or as JSON text, checked as Constraint.json_schema checks it ({} or none: any
    object)."""
    return json.loads(Constraint.json_schema(schema or {"type": "object"}).source)

