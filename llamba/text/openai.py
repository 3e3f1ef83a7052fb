"""The OpenAI response shapes, built in one place for the Python API (api.py) and the server (server/app.py):
completions and chat completions, whole or as stream chunks, with usage and finish reasons."""

from __future__ import annotations

import time
import uuid


def response_meta(kind: str, model: str) -> dict:
    """id, created, model: the head every response and chunk of one answer shares (kind: cmpl, chatcmpl)."""
    return {"id": f"{kind}-{uuid.uuid4().hex[:16]}", "created": int(time.time()), "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish_reason(reason: str | None) -> str:
    """OpenAI's word for why an answer ended: running out of context is "length" there too."""
    return "length" if reason in ("length", "context") else reason or "stop"


def completion(meta: dict, text: str, finish_reason: str, usage: dict, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}


def completion_chunk(meta: dict, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "text_completion", "choices": [choice]}


def chat_completion(meta: dict, text: str, finish_reason: str, usage: dict, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
              "logprobs": logprobs}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}


def chat_chunk(meta: dict, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    """One chunk of a streamed chat answer: the first's delta names the role (the server adds OpenAI's
    "content": "", the API keeps llama-cpp-python's bare role), then {"content": text} pieces, the last an empty
    delta with the finish reason."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    return {**meta, "object": "chat.completion.chunk", "choices": [choice]}


def usage_chunk(meta: dict, object_name: str, usage: dict) -> dict:
    """The last chunk of a stream when the client asked for usage (stream_options.include_usage)."""
    return {**meta, "object": object_name, "choices": [], "usage": usage}

