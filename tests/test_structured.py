"""Structured output and tool calls through the Python API and the CLI, on the real test models: outputs checked
by jsonschema and Python's re, masks against the vocabulary's own bytes, guessing ahead against plain decoding."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from llamba import Llama
from llamba.errors import BadRequestError
from llamba.generation.constraints import Constraint, GrammarMask
from llamba.generation.sampling import Candidates
from llamba.text.tools import ToolCallStream, plan_chat, split_tool_calls
from tests.test_cli import assert_one_line_error, llamba
from tests.test_tool_formats import _lazy_answer

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "role": {"enum": ["admin", "user", "guest"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}
# arrays, anyOf, $ref and nested objects: the OpenAI strict subset's shapes
MEMBER = {"type": "object", "additionalProperties": False, "required": ["name", "id"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, {"type": "null"}]}}}
TEAM = {"$defs": {"member": MEMBER}, "type": "object", "required": ["team", "members"], "additionalProperties": False,
        "properties": {"team": {"type": "string", "maxLength": 30},
                       "members": {"type": "array", "items": {"$ref": "#/$defs/member"}, "minItems": 1, "maxItems": 3}}}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def llm(request):
    return Llama(request.param, n_ctx=1024)


@pytest.fixture(scope="module")
def qwen():
    return Llama("qwen2.5-coder-0.5b", n_ctx=2048)


def _chat(llm, question: str, **kwargs) -> str:
    out = llm.create_chat_completion([{"role": "user", "content": question}], **kwargs)
    return out["choices"][0]


@pytest.mark.parametrize("schema", [PERSON, TEAM], ids=["person", "team"])
@pytest.mark.parametrize("temperature", [0, 0.9])
def test_json_schema_output_validates(llm, schema, temperature):
    choice = _chat(llm, "Describe an example as JSON.", max_tokens=200, temperature=temperature, seed=7,
                   response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_generate_takes_schema_regex_and_gbnf(llm):
    text = llm.generate("My favourite person, as JSON:", json_schema=PERSON, max_tokens=120, temperature=0)
    jsonschema.validate(json.loads(text), PERSON)
    date = llm.generate("Today's date is", regex=r" [0-9]{4}-[0-9]{2}-[0-9]{2}", max_tokens=20, temperature=0.8,
                        seed=3)
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", date) and llm.last_stats.finish_reason == "stop"
    gbnf = 'root ::= answer " because " [a-z ]+ "."\nanswer ::= "yes" | "no"'
    said = llm.generate("Is the sky blue? Answer:", grammar=gbnf, max_tokens=40, temperature=0)
    if llm.last_stats.finish_reason == "stop":
        assert re.fullmatch(r"(yes|no) because [a-z ]+\.", said), said
    else:  # the budget ran out: a prefix of a sentence of the grammar
        assert re.fullmatch(r"(yes|no) because [a-z ]*", said), said


def test_json_object_mode_gives_an_object(qwen):
    choice = _chat(qwen, "List two fruits.", max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_schema_that_cannot_finish_ends_with_length(llm):
    choice = _chat(llm, "Describe a team.", max_tokens=6, temperature=0,
                   response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": TEAM}})
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(json_schema={"type": "objekt"}), "invalid JSON schema"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(grammar="root ::= missing_rule"), "invalid GBNF grammar"),
    (dict(regex="[a-"), "invalid regular expression"),
    (dict(regex="a", json_schema={}), "give one of"),
])
def test_bad_constraints_are_one_line_errors(qwen, kwargs, fragment):
    with pytest.raises(BadRequestError, match=fragment) as caught:
        qwen.generate("x", max_tokens=4, **kwargs)
    assert "\n" not in str(caught.value)


def test_the_mask_is_the_vocabulary_tokens_the_regex_allows(qwen):
    """Against the vocabulary's own bytes: after nothing, [0-9]{1,3} allows exactly the tokens of 1-3 digits;
    after three digits only the end-of-generation tokens."""
    vocab = qwen.tokenizer.vocabulary_bytes()
    mask = GrammarMask(qwen.grammar_vocabulary, Constraint("regex", "[0-9]{1,3}"))
    expected = {i for i, b in enumerate(vocab) if re.fullmatch(rb"[0-9]{1,3}", b)}
    logits = np.random.default_rng(0).standard_normal(len(vocab)).astype(np.float32)
    masked = mask.apply(Candidates(None, logits), [1, 2, 3])
    assert set(np.flatnonzero(np.isfinite(masked.logits)).tolist()) == expected
    assert np.array_equal(masked.logits[list(expected)], logits[list(expected)])  # the allowed keep their logits
    assert mask.apply(Candidates(None, logits), [1, 2]).logits is logits  # another position: not masked
    for digit in "123":
        assert not mask.finished or digit != "1"
        mask.accept(qwen.tokenizer.token_to_id[digit])
    assert set(np.flatnonzero(mask.allowed()).tolist()) == qwen.tokenizer.eog_ids
    assert mask.finished


@pytest.mark.parametrize("decoding", ["prompt-lookup", "lookahead", "auto"])
def test_guessing_ahead_gives_constrained_greedy(qwen, decoding):
    """Guesses are checked against the mask: the same tokens as constrained greedy decoding, and prompt lookup
    does guess here (the answer copies the prompt's JSON)."""
    record = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin"})
    prompt = qwen.chat_prompt_ids([{"role": "user", "content": f"Repeat this JSON exactly: {record}"}])
    constraint = Constraint.json_schema(PERSON)
    plain = [s.token for s in qwen.stream_tokens(prompt, 60, constraint=constraint, temperature=0,
                                                 decoding="greedy")]
    guessed = [s.token for s in qwen.stream_tokens(prompt, 60, constraint=constraint, temperature=0,
                                                   decoding=decoding)]
    assert guessed == plain
    jsonschema.validate(json.loads(qwen.detokenize([t for t in plain if t >= 0])), PERSON)
    if decoding == "prompt-lookup":
        assert qwen.last_stats.speculation.accepted > 0


def test_tool_calls_follow_the_tools_schemas(qwen):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = _chat(qwen, "What's the weather in Paris?", tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=80,
                    temperature=0)
        assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None
        (call,) = out["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])
    out = _chat(qwen, "What's the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="none", max_tokens=30,
                temperature=0)
    assert "tool_calls" not in out["message"] and out["finish_reason"] in ("stop", "length")


def test_streamed_tool_calls_add_up_to_the_whole_answer(qwen):
    kwargs = dict(tools=[WEATHER_TOOL], tool_choice="required", max_tokens=80, temperature=0)
    whole = _chat(qwen, "Weather in Oslo?", **kwargs)["message"]["tool_calls"][0]
    chunks = list(qwen.create_chat_completion([{"role": "user", "content": "Weather in Oslo?"}], stream=True,
                                              **kwargs))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["function"] == {"name": "get_weather",
                                                                                  "arguments": ""}
    assert len(calls) > 2  # the arguments stream in fragments as they form
    assert "".join(c["function"]["arguments"] for c in calls) == whole["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_under_auto_the_tool_call_token_starts_the_grammar(qwen):
    """Qwen's <tool_call> is one special token: once drawn it starts the grammar, fed to it as itself."""
    assert qwen.tokenize("<tool_call>", add_bos=False) == [qwen.tokenizer.token_to_id["<tool_call>"]]
    content, calls = qwen.chat_plan([WEATHER_TOOL], "auto").split(
        _lazy_answer(qwen, "I will check.<tool_call>", tools=[WEATHER_TOOL]))
    (call,) = calls
    assert content == "I will check." and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_tool_choice_and_tools_are_checked():
    with pytest.raises(BadRequestError, match="not among the tools"):
        plan_chat([WEATHER_TOOL], {"type": "function", "function": {"name": "get_time"}})
    with pytest.raises(BadRequestError, match="tool_choice must be"):
        plan_chat([WEATHER_TOOL], "sometimes")
    with pytest.raises(BadRequestError, match="tools\\[0\\]"):
        plan_chat([{"type": "function"}])
    with pytest.raises(BadRequestError, match="response_format.type"):
        plan_chat(response_format={"type": "xml"})


def test_tool_call_text_split_at_any_point_gives_the_same_deltas():
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>')
    content, calls = split_tool_calls(text)
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]
    for cut in range(1, len(text)):
        stream = ToolCallStream()
        deltas = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush()
        assert "".join(d.get("content", "") for d in deltas) == "Let me check."
        assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d) == \
            calls[0].arguments
    assert split_tool_calls("<tool_call>\n{not json}\n</tool_call>") == ("<tool_call>\n{not json}\n</tool_call>", [])
    fenced = '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```'
    assert split_tool_calls(fenced, {"get_weather"})[1][0].name == "get_weather"
    assert split_tool_calls(fenced, {"other"}) == (fenced, [])


def test_cli_generate_with_a_schema_file_and_a_regex(tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    out = llamba("generate", "qwen2.5-coder-0.5b", "--chat", "-p", "A person as JSON.", "--json-schema", schema,
                 "--temp", "0", "-n", "100", "--json")
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(json.loads(out.stdout)["text"]), PERSON)
    out = llamba("generate", "smollm2-135m", "-p", "The year was", "--regex", " [0-9]{4}", "--temp", "0", "--json")
    assert re.fullmatch(r" [0-9]{4}", json.loads(out.stdout)["text"])


def test_cli_bad_constraints_are_one_line(tmp_path):
    assert_one_line_error(llamba("generate", "smollm2-135m", "-p", "x", "--json-schema", '{"type": "objekt"}'),
                          "invalid JSON schema")
    assert_one_line_error(llamba("generate", "smollm2-135m", "-p", "x", "--grammar", tmp_path / "none.gbnf"),
                          "cannot read the grammar")
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= (")
    assert_one_line_error(llamba("chat", "smollm2-135m", "--grammar", bad), "invalid GBNF grammar")
