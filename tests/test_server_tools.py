"""Structured output and tool calls against a live `llamba serve` on Qwen2.5-Coder-1.5B-Instruct, with the real
`openai` client: response_format, tools and tool_choice in OpenAI's shapes, a whole agent loop, streamed tool
calls, 400s for bad schemas and tool choices, and answers beside constrained neighbours equal to lone ones."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

from llamba import store
from tests.test_server import Server

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-1.5b"
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers exactly",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "country": {"type": "string", "maxLength": 40},
                                         "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
        "required": ["city", "country", "population_millions"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    s = Server(store.resolve_model(MODEL), "-np", "2", "-c", "2048")
    yield s
    s.stop()


def _ask(client, messages, **kwargs):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.chat.completions.create(model=store.resolve_model(MODEL).name, messages=messages, temperature=0, **kwargs)


def test_response_format_json_schema_and_json_object(server):
    client = server.client(timeout=300)
    answer = _ask(client, "Describe the capital of France.", max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), CITY)
    answer = _ask(client, "Two primary colours, please.", max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_bad_schemas_formats_and_tool_choices_are_400(server):
    client = server.client(timeout=60)
    with pytest.raises(openai.BadRequestError, match="invalid JSON schema"):
        _ask(client, "x", max_tokens=4, response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    with pytest.raises(openai.BadRequestError, match="response_format.type"):
        _ask(client, "x", max_tokens=4, response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        _ask(client, "x", max_tokens=4, tools=[MULTIPLY],
             tool_choice={"type": "function", "function": {"name": "divide"}})
    with pytest.raises(openai.BadRequestError, match="invalid GBNF grammar"):
        client.completions.create(model=store.resolve_model(MODEL).name, prompt="x", max_tokens=4, extra_body={"grammar": "root ::= ("})


def test_an_agent_loop_question_tool_call_result_answer(server):
    """The model asks for the tool (finish_reason tool_calls, arguments that follow its schema), gets the
    result as a role: tool message (rendered by the model's own template), and answers from it."""
    client = server.client(timeout=300)
    messages = [{"role": "user", "content": "What is 1234 times 5678? Use the multiply tool."}]
    first = _ask(client, messages, tools=[MULTIPLY], max_tokens=80)
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, MULTIPLY["function"]["parameters"])
    assert call.function.name == "multiply" and arguments == {"a": 1234, "b": 5678}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": str(arguments["a"] * arguments["b"])}]
    final = _ask(client, messages, tools=[MULTIPLY], max_tokens=200)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert "7006652" in final.choices[0].message.content.replace(",", "")


def test_streamed_tool_calls_are_openai_deltas(server):
    client = server.client(timeout=300)
    question = "Multiply 12 by 34 with the tool."
    whole = _ask(client, question, tools=[MULTIPLY], tool_choice="required", max_tokens=60)
    chunks = list(_ask(client, question, tools=[MULTIPLY], tool_choice="required", max_tokens=60, stream=True))
    parts = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert parts[0].index == 0 and parts[0].id and parts[0].function.name == "multiply"
    assert all(p.index == 0 for p in parts) and all(p.id is None for p in parts[1:])
    expected = whole.choices[0].message.tool_calls[0].function
    assert "".join(p.function.arguments or "" for p in parts) == expected.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_constrained_and_free_requests_together_answer_as_alone(server):
    """Batch invariance with a constraint on one sequence only: beside each other, both get their lone answers;
    and a constrained request that guesses ahead (its guesses checked against the mask in its share of the
    batch) gets its greedy answer too."""
    client = server.client(timeout=300)
    constrained = dict(max_tokens=60, response_format={"type": "json_schema",
                                                       "json_schema": {"name": "city", "schema": CITY}})
    free = dict(max_tokens=40)
    requests = [("Describe Tokyo.", constrained), ("Write a haiku about rain.", free)]
    alone = [_ask(client, q, **kw).choices[0].message.content for q, kw in requests]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda r: _ask(client, r[0], **r[1]).choices[0].message.content, requests))
    assert together == alone
    jsonschema.validate(json.loads(alone[0]), CITY)
    guessing = [(q, {**kw, "extra_body": {"decoding": decoding}}) for (q, kw), decoding in
                zip(requests, ("prompt-lookup", "lookahead"))]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda r: _ask(client, r[0], **r[1]).choices[0].message.content, guessing))
    assert together == alone
