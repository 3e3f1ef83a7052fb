"""The HTTP face of the engine: OpenAI-shaped endpoints on FastAPI, request bodies checked by pydantic.

Every error is an OpenAI-shaped JSON body with a 4xx status ({"error": {"message", "type", "param", "code"}}),
including malformed JSON and out-of-range values; a full server answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextOverflowError, LlambaError, NotFoundError, OverloadError
from ..generation.constraints import Constraint, Trigger, constraint_from
from ..generation.sampling import OPTIONS, Sampler, option_type
from ..text import openai
from ..text.tools import ChatPlan
from .engine import Engine, Event, Job, Request


MAX_TOKENS = 2**31 - 1  # llama-server's n_predict is an int32: a larger budget is a mistake, not a wish


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data):
        """JSON's \\ud800 escapes decode to lone surrogates, which no UTF-8 tokenizer can take."""
        if _has_lone_surrogate(data):
            raise ValueError("the body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
        return data


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


class StreamOptions(_Body):
    include_usage: bool = False


def _sampling_fields() -> dict:
    """A request field per option of SamplingParams: its default, and its range as OpenAI bounds it."""
    def annotation(option):
        return option_type(option) if option.default is not None else option_type(option) | None

    return {o.name: (annotation(o), Field(o.default, **o.metadata["api_bounds"])) for o in OPTIONS}


_SamplingFields = create_model("_SamplingFields", __base__=_Body, **_sampling_fields())


class _Sampling(_SamplingFields):
    model: str | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    decoding: str | None = None  # llamba's: guess ahead (same output): see generation/decoding
    json_schema: dict | None = None  # llama-server's: the output follows this schema
    grammar: str | None = None  # llama-server's: the output follows this GBNF grammar

    def sampler(self, llm, constraint: Constraint | None = None, trigger: Trigger | None = None) -> Sampler:
        """The request's sampler; constraint (else the request's own json_schema or grammar) masks its chain."""
        constraint = constraint or constraint_from(json_schema=self.json_schema, grammar=self.grammar)
        return llm.sampler(constraint, trigger, **{o.name: getattr(self, o.name) for o in OPTIONS})

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls, for the chat template
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        extra = {"tool_calls": self.tool_calls, "tool_call_id": self.tool_call_id, "name": self.name}
        return {**message, **{k: v for k, v in extra.items() if v is not None}}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = False  # llama-server's default: a small model allowed more calls repeats them

    def plan(self, llm) -> ChatPlan:
        return llm.chat_plan(self.tools, self.tool_choice, self.response_format, self.parallel_tool_calls)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=0, le=MAX_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=20)


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]  # checked further by Llama.embed_input_ids
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_for(e: LlambaError, param: str | None = None) -> JSONResponse:
    """The OpenAI error a LlambaError becomes, chosen by its type (any other kind is the client's bad request)."""
    if isinstance(e, OverloadError):
        return _error(503, str(e), kind="server_busy", headers={"Retry-After": "1"})
    if isinstance(e, NotFoundError):
        return _error(404, str(e), code="not_found")
    code = "context_length_exceeded" if isinstance(e, ContextOverflowError) else None
    return _error(400, str(e), param=param, code=code)


class _HTTPError(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


def create_app(engine: Engine, model_id: str, api_key: str | None = None, aliases: tuple[str, ...] = (),
               default_decoding: str = "greedy") -> FastAPI:
    app = FastAPI(title="llamba", docs_url=None, redoc_url=None)
    app.state.stopping = False  # set on SIGTERM (server/__init__.py): new work is refused
    llm, tokenizer = engine.llm, engine.tokenizer
    known_models = {model_id, *aliases}
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return _error(400, message, param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_status(_, exc: StarletteHTTPException):  # unknown routes (404), wrong methods (405)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(_HTTPError)
    async def http_error(_, exc: _HTTPError):
        return exc.response

    @app.middleware("http")
    async def refuse_when_stopping(request: HTTPRequest, call_next):
        """After SIGTERM (server/__init__.py): new work is refused, so a balancer sends it elsewhere."""
        if app.state.stopping and request.url.path != "/metrics":
            return _error(503, "the server is shutting down", kind="server_shutting_down", code="shutting_down",
                          headers={"Connection": "close"})
        return await call_next(request)

    @app.middleware("http")
    async def check_key(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name not in known_models:
            raise _HTTPError(_error(404, f"model {name!r} is not served here (serving {model_id!r})",
                                    param="model", code="model_not_found"))

    def submit(prompt_ids: list[int], body: _Sampling, max_tokens: int, top_logprobs: int | None,
               plan: ChatPlan | None = None):
        if not prompt_ids:
            raise _HTTPError(_error(400, "the prompt is empty", param="prompt"))
        try:
            sampler = body.sampler(llm, plan.constraint, plan.trigger) if plan else body.sampler(llm)
            request = Request(prompt_ids, max_tokens, sampler, body.stops(), top_logprobs,
                              decoding=body.decoding or default_decoding)
            loop = asyncio.get_running_loop()
            inbox: asyncio.Queue[Event] = asyncio.Queue()
            request.deliver = lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event)
            engine.submit(request)
        except LlambaError as e:
            raise _HTTPError(_error_for(e))
        return request, inbox

    async def events(request: Request, inbox: asyncio.Queue):
        """The engine's events for one request; leaving early (a client gone) cancels the generation."""
        try:
            while True:
                event = await inbox.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            request.cancel()

    async def collect(request: Request, inbox: asyncio.Queue) -> tuple[str, list[dict], Event]:
        """A whole answer: its text, the logprob entries of its tokens, and the final event."""
        text, entries, last = [], [], None
        async for event in events(request, inbox):
            text.append(event.text)
            entry = logprob_entry(event)
            if entry:
                entries.append(entry)
            last = event
        return "".join(text), entries, last

    def bad_token_ids(ids: list[int], param: str) -> JSONResponse | None:
        if any(not 0 <= t < len(tokenizer.tokens) for t in ids):
            return _error(400, f"token ids must be in 0..{len(tokenizer.tokens) - 1}", param=param)
        return None

    def failed(last: Event) -> JSONResponse:
        """An answer that ended in an error: cut by a stop whose time ran out (503), or a failed step (500)."""
        if app.state.stopping:
            return _error(503, last.error, kind="server_shutting_down", code="shutting_down")
        return _error(500, last.error, kind="server_error")

    def meta(kind: str) -> dict:
        return openai.response_meta(kind, model_id)

    def usage(request: Request) -> dict:
        return openai.usage(len(request.prompt_ids), request.generated, request.cached_tokens)

    def finish(event: Event) -> str:
        if event.error:
            return "error"
        return event.finish_reason

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    def chat_logprobs(entries: list[dict]) -> dict:
        def one(token, logprob):
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(e["token"], e["logprob"]),
                             "top_logprobs": [one(t, lp) for t, lp in e["top"]]} for e in entries]}

    def completion_logprobs(entries: list[dict], offset0: int = 0) -> dict:
        tokens, offsets, at = [], [], offset0
        for e in entries:
            tokens.append(token_text(e["token"]))
            offsets.append(at)
            at += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{token_text(t): lp for t, lp in e["top"]} for e in entries], "text_offset": offsets}

    def logprob_entry(event: Event) -> dict | None:
        return {"token": event.token, **event.logprobs} if event.logprobs is not None and event.token >= 0 else None

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots_idle": engine.free_slots(), "slots_processing": engine.busy_slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "llamba"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return {"tokens": llm.tokenize(body.content, add_bos=body.add_special, special=body.add_special)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = bad_token_ids(body.tokens, "tokens")
        if bad:
            return bad
        return {"content": llm.detokenize(body.tokens)}

    async def on_engine(work):
        """work() run on the engine's thread (the only one that drives the model), once before each of its
        steps until it returns True (done); raises what it raised, or an OverloadError if the server stopped."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        gone = threading.Event()  # the client left: the engine drops the work

        def settle(error):
            if not answer.done():
                answer.set_exception(error) if error else answer.set_result(None)

        def step() -> bool:
            if gone.is_set():
                return True
            try:
                if not work():
                    return False
                error = None
            except Exception as e:  # noqa: BLE001 - handed to the request, never raised in the engine
                error = e
            loop.call_soon_threadsafe(settle, error)
            return True

        engine.call(Job(step, end=lambda message: loop.call_soon_threadsafe(settle, OverloadError(message))))
        try:
            await answer
        finally:
            gone.set()

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        try:
            texts = llm.embed_input_ids(body.input)
            job = llm.embedding_job(texts)
            await on_engine(job.step)
            vectors = job.vectors
        except LlambaError as e:
            return _error_for(e, param="input")
        if body.encoding_format == "base64":  # little-endian float32 bytes, as OpenAI's client decodes them
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        return openai.embeddings(model_id, data, sum(map(len, texts)))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        try:
            plan = body.plan(llm)
        except LlambaError as e:
            return _error_for(e)
        try:
            prompt_ids = llm.chat_prompt_ids([m.plain() for m in body.messages], plan=plan)
        except LlambaError as e:
            return _error(400, str(e), param="messages")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        request, inbox = submit(prompt_ids, body, limit, n_top, plan)  # no limit: the rest of the context
        if body.stream:
            return _sse(chat_chunks(request, inbox, meta("chatcmpl"), body, plan))
        text, entries, last = await collect(request, inbox)
        if last.error:
            return failed(last)
        logprobs = chat_logprobs(entries) if n_top is not None else None
        content, calls = plan.split(text)
        return openai.chat_completion(meta("chatcmpl"), content, finish(last), usage(request), logprobs, calls)

    async def chat_chunks(request, inbox, head: dict, body: ChatRequest, plan: ChatPlan):
        yield openai.chat_chunk(head, {"role": "assistant", "content": ""})
        deltas = plan.deltas()
        async for event in events(request, inbox):
            entry = logprob_entry(event)
            pieces = deltas.feed(event.text) or ([{"content": ""}] if entry else [])  # logprobs ride on content
            for i, delta in enumerate(pieces):
                yield openai.chat_chunk(head, delta, logprobs=chat_logprobs([entry]) if entry and not i else None)
            if event.finish_reason is not None:
                for delta in deltas.flush():
                    yield openai.chat_chunk(head, delta)
                yield openai.chat_chunk(head, {}, openai.chat_finish_reason(finish(event), bool(deltas.calls)))
        if body.stream_options and body.stream_options.include_usage:
            yield openai.usage_chunk(head, "chat.completion.chunk", usage(request))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = llm.tokenize(body.prompt)
        else:
            bad = bad_token_ids(body.prompt, "prompt")
            if bad:
                return bad
            prompt_ids = list(body.prompt)
        request, inbox = submit(prompt_ids, body, body.max_tokens, body.logprobs)
        if body.stream:
            return _sse(completion_chunks(request, inbox, meta("cmpl"), body))
        text, entries, last = await collect(request, inbox)
        if last.error:
            return failed(last)
        logprobs = completion_logprobs(entries) if body.logprobs is not None else None
        return openai.completion(meta("cmpl"), text, finish(last), usage(request), logprobs)

    async def completion_chunks(request, inbox, head: dict, body: CompletionRequest):
        async for event in events(request, inbox):
            entry = logprob_entry(event)
            if event.text or entry:
                yield openai.completion_chunk(head, event.text, logprobs=completion_logprobs([entry]) if entry else None)
            if event.finish_reason is not None:
                yield openai.completion_chunk(head, "", finish(event))
        if body.stream_options and body.stream_options.include_usage:
            yield openai.usage_chunk(head, "text_completion", usage(request))

    return app


def _sse(chunks) -> StreamingResponse:
    async def lines():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _prometheus(engine: Engine) -> str:
    from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest

    disable_created_metrics()

    registry = CollectorRegistry()
    for name, help_text in (("requests", "Requests accepted"), ("prompt_tokens", "Prompt tokens received"),
                            ("evaluated_prompt_tokens", "Prompt tokens evaluated (the rest came from the cache)"),
                            ("cached_prompt_tokens", "Prompt tokens whose KV was reused from a slot's cache"),
                            ("generated_tokens", "Tokens generated")):
        Counter(f"llamba_{name}", help_text, registry=registry).inc(engine.counters[name])
    for name, help_text, value in (("queue_length", "Requests waiting for a slot", len(engine.waiting)),
                                   ("slots_processing", "Slots generating", engine.busy_slots),
                                   ("slots_idle", "Slots free", engine.free_slots()),
                                   ("tokens_per_second", "Tokens generated per second in the last step",
                                    engine.tokens_per_second),
                                   ("kv_cache_budget_bytes", "KV cache of all slots, allocated at start",
                                    engine.cache.nbytes),
                                   ("kv_cache_used_bytes", "KV cache holding tokens", engine.cache.nbytes_used)):
        Gauge(f"llamba_{name}", help_text, registry=registry).set(value)
    return generate_latest(registry).decode()
