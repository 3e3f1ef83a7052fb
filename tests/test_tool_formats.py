"""Tool-call formats read from the chat template (Hermes, Llama 3.x, Mistral Nemo, generic): the real templates of
Llama 3.1 / 3.2 and Mistral Nemo (tests/templates) render the tools, earlier calls and tool results; their calls
parse back, whole or streamed from any cut; on SmolLM2 with each template swapped in, the grammar (from the
first token, or lazily after the format's trigger) gives calls that jsonschema validates; response_format with
tools gives a call or JSON of the schema; and a live server streams a call's arguments in fragments to the
openai client."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from llamba import Llama
from llamba.generation.sampling import Candidates
from llamba.text.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from llamba.text.tool_formats import GENERIC, HERMES, LLAMA3, MISTRAL_NEMO, detect_format
from llamba.text.tools import ToolCallStream, plan_chat, split_tool_calls
from tests.test_server import Server

TEMPLATES = Path(__file__).parent / "templates"
LLAMA31 = TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"
LLAMA32 = TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja"
NEMO = TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note with a title and a long text",
    "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                    "text": {"type": "string", "minLength": 60, "maxLength": 200}},
                   "required": ["title", "text"], "additionalProperties": False}}}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                         "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"], "additionalProperties": False}
CALL_ID = "abcDEF123"  # Nemo's template takes 9 letters and digits only
HISTORY = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": CALL_ID, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "18 degrees, sunny"},
    {"role": "assistant", "content": "It is 18 degrees and sunny in Paris."},
    {"role": "user", "content": "And in Rome?"}]


def _render(path: Path | None, messages=HISTORY, tools=(WEATHER,)) -> str:
    source = path.read_text() if path else BUILTIN_TEMPLATES["chatml"]
    template = ChatTemplate(source, "test", bos_token="<s>", eos_token="</s>")
    plan = plan_chat(list(tools), "auto", tool_format=detect_format(source))
    return template.render(plan.prompt_messages(messages, source), tools=plan.tools, **plan.template_variables)


# ----------------------------------------------------------------------------------- templates and prompts

def test_the_format_is_read_from_the_template():
    assert detect_format(LLAMA31.read_text()) is LLAMA3 and detect_format(LLAMA32.read_text()) is LLAMA3
    assert detect_format(NEMO.read_text()) is MISTRAL_NEMO
    assert detect_format("{% for m in messages %}<tool_call>{% endfor %}") is HERMES
    assert detect_format(BUILTIN_TEMPLATES["chatml"]) is GENERIC


@pytest.mark.parametrize("path", [LLAMA31, LLAMA32], ids=["llama3.1", "llama3.2"])
def test_llama3_templates_render_tools_calls_and_results(path):
    text = _render(path)
    assert "Environment: ipython" in text and '"name": "get_weather"' in text  # the tools, in the system message
    assert text.index('"name": "get_weather"') < text.index("<|eot_id|>")  # llama.cpp: not in the user message
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Paris", "unit": "C"}}<|eot_id|>') in text  # the earlier call, arguments as an object
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n" in text and "18 degrees, sunny" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_nemo_template_renders_tools_calls_and_results():
    text = _render(NEMO)
    tools = text[text.index("[AVAILABLE_TOOLS]") + len("[AVAILABLE_TOOLS]"):text.index("[/AVAILABLE_TOOLS]")]
    assert json.loads(tools) == [WEATHER]  # before the last user message, as Nemo was trained
    assert text.index("[AVAILABLE_TOOLS]") > text.index("[TOOL_RESULTS]")
    call = f'{{"name": "get_weather", "arguments": {{"city": "Paris", "unit": "C"}}, "id": "{CALL_ID}"}}'
    assert f"[TOOL_CALLS][{call}]" in text
    assert f'[TOOL_RESULTS]{{"content": 18 degrees, sunny, "call_id": "{CALL_ID}"}}[/TOOL_RESULTS]' in text


def test_generic_format_describes_the_tools_to_a_template_without_them():
    text = _render(None)
    system = text[:text.index("<|im_end|>")]
    assert "`tool_call`" in system and "`response`" in system
    listing = system[system.index("["):system.rindex("]") + 1]
    assert json.loads(listing) == [WEATHER["function"]]
    call = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert json.loads(call) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"},
                                              "id": CALL_ID}}
    assert json.loads(text.split("<|im_start|>user\n")[2].split("<|im_end|>")[0]) == {
        "tool_response": {"tool_call_id": CALL_ID, "content": "18 degrees, sunny"}}


@pytest.mark.parametrize("path, tool_format, start, end", [
    (LLAMA31, LLAMA3, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    (NEMO, MISTRAL_NEMO, "[/INST]", "</s>"),
    (None, GENERIC, "<|im_start|>assistant\n", "<|im_end|>")], ids=["llama3", "mistral-nemo", "generic"])
def test_a_call_the_template_writes_parses_back(path, tool_format, start, end):
    """Round trip: the earlier call as the real template writes it into the prompt reads back as that call."""
    text = _render(path)
    written = text.split(start)[1].split(end)[0]
    content, calls = split_tool_calls(written, None, tool_format)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]


# ----------------------------------------------------------------------------------------- parsing answers

ANSWERS = [
    (HERMES, 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
             '\n<tool_call>\n{"name": "save_note", "arguments": {"title": "a}b", "text": "x\\"y"}}\n</tool_call>'),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}'),
    (LLAMA3, '<|python_tag|>{"type": "function", "name": "save_note", '
             '"parameters": {"title": "a}b", "text": "x\\"y"}}'),
    (MISTRAL_NEMO, 'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, '
                   '"id": "abcDEF123"}, {"name": "save_note", "arguments": {"title": "a}b", "text": "x\\"y"}, '
                   '"id": "x1y2z3w4v"}]'),
    (MISTRAL_NEMO, '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}, "id": "abcDEF123"}]'),
    (GENERIC, '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}'),
    (GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
              '{"name": "save_note", "arguments": {"title": "a}b", "text": "x\\"y"}}]}'),
]


@pytest.mark.parametrize("tool_format, text", ANSWERS, ids=lambda x: getattr(x, "name", None))
def test_answers_parse_the_same_whole_or_streamed_from_any_cut(tool_format, text):
    content, calls = split_tool_calls(text, None, tool_format)
    expected = [("get_weather", {"city": "Paris", "unit": "C"}), ("save_note", {"title": "a}b", "text": 'x"y'})]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [e for e in expected if f'"{e[0]}"' in text]
    assert content == ("Checking." if text.startswith("Checking") else None)
    if tool_format is MISTRAL_NEMO:
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    for cut in range(len(text) + 1):
        stream = ToolCallStream(None, tool_format)
        deltas = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush()
        assert "".join(d.get("content", "") for d in deltas).strip() == (content or "")
        assert [(c.name, c.arguments) for c in stream.calls] == [(c.name, c.arguments) for c in calls]
        for index, call in enumerate(stream.calls):
            parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and d["tool_calls"][0]["index"] == index]
            assert parts[0] == {"index": index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}
            assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in parts[1:])
            assert "".join(p["function"]["arguments"] for p in parts) == call.arguments


def test_text_that_is_no_call_stays_content():
    for tool_format, text in [(LLAMA3, 'Hello {"name": "x", "parameters": {}}'),
                              (HERMES, "<tool_call>\nno\n</tool_call>"), (MISTRAL_NEMO, "A list: [1, 2]"),
                              (GENERIC, '{"response": "Hi there"}')]:
        expected = "Hi there" if tool_format is GENERIC else text
        assert split_tool_calls(text, None, tool_format) == (expected, [])
    assert split_tool_calls('{"response": {"city": "Oslo"}}', None, GENERIC) == ('{"city": "Oslo"}', [])
    content, calls = split_tool_calls('<tool_call>no</tool_call> then <tool_call>\n{"name": "get_weather", '
                                      '"arguments": {}}\n</tool_call>', None, HERMES)
    assert content == "<tool_call>no</tool_call> then" and [c.name for c in calls] == ["get_weather"]


def test_a_generic_response_streams_as_decoded_content():
    """A generic-format answer {"response": "..."} streams its string as content as it comes, decoded: never
    half an escape or half a surrogate pair, whatever the cut."""
    text = '{"response": "Caf\\u00e9 \\"ok\\"\\n\\ud83d\\ude00 done \\\\ end"}'
    expected = json.loads(text)["response"]
    assert split_tool_calls(text, None, GENERIC) == (expected, [])
    for cut in range(len(text) + 1):
        stream = ToolCallStream(None, GENERIC)
        first = stream.feed(text[:cut])
        pieces = first + stream.feed(text[cut:]) + stream.flush()
        assert "".join(p["content"] for p in pieces) == expected
        assert "".join(p["content"] for p in first) == expected[:len("".join(p["content"] for p in first))]
    stream = ToolCallStream(None, GENERIC)
    assert len([p for c in text for p in stream.feed(c)]) > 10  # piece by piece, not at the end


# --------------------------------------------------------------------------- grammars on a real small model

@pytest.fixture(scope="module")
def models():
    """SmolLM2 with each template: its own (no tools: the generic format), Llama 3.1's and Mistral Nemo's."""
    return {name: Llama("smollm2-135m", n_ctx=2048, chat_template=str(path) if path else None)
            for name, path in [("generic", None), ("llama3", LLAMA31), ("mistral-nemo", NEMO)]}


def _arguments_valid(call: dict, tools=(WEATHER, NOTE)) -> None:
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["generic", "llama3", "mistral-nemo"])
def test_required_and_named_calls_follow_the_schemas(models, name):
    llm = models[name]
    assert llm.chat_plan([WEATHER]).format.name == name
    for choice in ("required", {"type": "function", "function": {"name": "save_note"}}):
        out = llm.create_chat_completion([{"role": "user", "content": "Weather in Oslo, and note it down."}],
                                         tools=[WEATHER, NOTE], tool_choice=choice, max_tokens=320, temperature=0)
        # 320: room for the longest call the schemas allow (a 200-character text can take a token a character)
        choice_out = out["choices"][0]
        assert choice_out["finish_reason"] == "tool_calls" and choice_out["message"]["content"] is None
        (call,) = choice_out["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"]
        if choice != "required":
            assert call["function"]["name"] == "save_note"
        _arguments_valid(call)


def _lazy_answer(llm, written: str, tools=(WEATHER,), max_tokens: int = 80) -> str:
    """The answer when the model has written `written` itself (under tool_choice auto, the free part before
    the trigger): the mask sees those tokens drawn, then the model goes on under it."""
    plan = llm.chat_plan(list(tools), "auto")
    prompt = llm.chat_prompt_ids([{"role": "user", "content": "What's the weather in Oslo?"}], plan=plan)
    forced = llm.tokenize(written, add_bos=False)
    sampler = llm.sampler(plan.constraint, plan.trigger, temperature=0)
    mask = sampler.constraint
    mask.apply(Candidates(None, np.zeros(llm.model.hp.n_vocab, np.float32)), prompt)  # the answer starts here
    for token in forced:
        assert not mask.active
        sampler.accept(token)
    assert mask.active  # the trigger was in the written text
    rest = [s.text for s in llm.stream_tokens(prompt + forced, max_tokens, sampler=sampler)]
    return written + "".join(rest)


@pytest.mark.slow
@pytest.mark.parametrize("name, written", [("llama3", '{"name": "'), ("mistral-nemo", "Let me look. [TOOL_CALLS]")])
def test_under_auto_the_trigger_starts_the_grammar(models, name, written):
    llm = models[name]
    plan = llm.chat_plan([WEATHER], "auto")
    assert plan.trigger is not None and plan.trigger.find(written.encode()) is not None
    content, calls = plan.split(_lazy_answer(llm, written))
    (call,) = calls
    assert call["function"]["name"] == "get_weather"
    _arguments_valid(call)
    assert content == ("Let me look." if name == "mistral-nemo" else None)


@pytest.mark.slow
def test_a_generic_answer_streams_its_response(models):
    """Under auto, SmolLM2's own template (no tools: the generic format) answers in JSON; a response's text
    streams as content, piece by piece, and adds up to the whole answer's."""
    llm, messages = models["generic"], [{"role": "user", "content": "Say hello to me."}]
    kwargs = dict(tools=[WEATHER], max_tokens=60, temperature=0)
    whole = llm.create_chat_completion(messages, **kwargs)["choices"][0]["message"]
    assert whole["content"] and not whole.get("tool_calls") and not whole["content"].lstrip().startswith("{")
    pieces = [c["choices"][0]["delta"].get("content") for c in llm.create_chat_completion(messages, stream=True,
                                                                                          **kwargs)]
    pieces = [p for p in pieces if p]
    assert len(pieces) > 3 and "".join(pieces) == whole["content"]


@pytest.mark.slow
def test_under_auto_the_answer_is_free_until_the_trigger(models):
    """Without the trigger nothing is masked: the same greedy answer as with no tools' grammar at all."""
    llm = models["mistral-nemo"]
    plan = llm.chat_plan([WEATHER], "auto")
    prompt = llm.chat_prompt_ids([{"role": "user", "content": "Say hello."}], plan=plan)
    free = [s.token for s in llm.stream_tokens(prompt, 20, temperature=0)]
    lazy = [s.token for s in llm.stream_tokens(prompt, 20, sampler=llm.sampler(plan.constraint, plan.trigger,
                                                                               temperature=0))]
    assert lazy == free


@pytest.mark.slow
@pytest.mark.parametrize("name", ["generic", "llama3", "mistral-nemo"])
def test_response_format_with_tools_gives_a_call_or_the_schemas_json(models, name):
    """OpenAI's behaviour: with tools and a response_format, the answer either calls a tool or is the JSON the
    response schema describes; never free text. The grammar allows both from the first token."""
    llm = models[name]
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    plan = llm.chat_plan([WEATHER], "auto", response_format)
    assert plan.trigger is None
    matcher = llm.grammar_vocabulary.matcher(plan.constraint)
    for question in ("Which city is the capital of Norway? Answer with the city and country.",
                     "What's the weather in Oslo?"):
        out = llm.create_chat_completion([{"role": "user", "content": question}], tools=[WEATHER],
                                         response_format=response_format, max_tokens=120, temperature=0)["choices"][0]
        assert out["finish_reason"] in ("stop", "tool_calls")
        if out["message"].get("tool_calls"):
            _arguments_valid(out["message"]["tool_calls"][0])
        else:
            jsonschema.validate(json.loads(out["message"]["content"]), CITY)
    assert not matcher.is_error()
    required = llm.chat_plan([WEATHER], "required", response_format)
    none = llm.chat_plan([WEATHER], "none", response_format)
    assert required.format is not None and none.format is None and none.tools is None


@pytest.mark.slow
def test_the_grammar_takes_a_call_or_an_answer_and_nothing_else(models):
    """With response_format and tools: a matcher over the vocabulary accepts the format's call and the schema's
    JSON, and rejects prose (checked on the tokens of each text)."""
    llm = models["mistral-nemo"]
    plan = llm.chat_plan([WEATHER], "auto", {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}})
    texts = {'[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}, "id": "abcDEF123"}]':
             True, '{"city": "Oslo", "country": "Norway"}': True, "Oslo is in Norway.": False,
             '{"city": "Oslo"}': False}
    for text, accepted in texts.items():
        matcher = llm.grammar_vocabulary.matcher(plan.constraint)
        ok = matcher.try_consume_tokens(llm.tokenize(text, add_bos=False)) == len(llm.tokenize(text, add_bos=False))
        assert (ok and matcher.is_accepting()) == accepted, text


@pytest.mark.slow
@pytest.mark.parametrize("name, one, two", [
    ("mistral-nemo", '[TOOL_CALLS][{@, "id": "abcDEF123"}]',
     '[TOOL_CALLS][{@, "id": "abcDEF123"}, {@, "id": "x1y2z3w4v"}]'),
    ("generic", '{"tool_call": {@}}', '{"tool_calls": [{@}, {@}]}')])
def test_parallel_tool_calls_allow_more_than_one_call(models, name, one, two):
    """A call's grammar takes one call, and more with parallel_tool_calls; the parser reads them all. (The
    generic format's parallel calls are always a "tool_calls" list, as llama.cpp's.)"""
    llm, call = models[name], '"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}'
    one, two = one.replace("@", call), two.replace("@", call)
    for parallel, accepted in ((False, [one]), (True, [one, two] if name == "mistral-nemo" else [two])):
        plan = llm.chat_plan([WEATHER], "required", parallel_tool_calls=parallel)
        for text in (one, two):
            matcher, tokens = llm.grammar_vocabulary.matcher(plan.constraint), llm.tokenize(text, add_bos=False)
            ok = matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()
            assert ok == (text in accepted), (parallel, text)
        assert [c.name for c in split_tool_calls(two, None, plan.format)[1]] == ["get_weather"] * 2


# ------------------------------------------------------------------------------------- streamed over HTTP

@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "--chat-template", str(LLAMA31), "-c", "2048")
    yield s
    s.stop()


@pytest.mark.slow
def test_a_call_streams_its_arguments_in_fragments(server, smollm2_path):
    client = server.client(timeout=300)
    kwargs = dict(model=smollm2_path.name, temperature=0, max_tokens=160, tools=[NOTE], tool_choice="required",
                  messages=[{"role": "user", "content": "Save a note about the history of Rome."}])
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    parts = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    head, fragments = parts[0], parts[1:]
    assert head.index == 0 and head.id and head.type == "function" and head.function.name == "save_note"
    assert head.function.arguments == ""
    assert len(fragments) > 5  # the arguments come as they form, not in one piece at the end
    assert all(p.index == 0 and p.id is None and p.type is None and p.function.name is None for p in fragments)
    arguments = "".join(p.function.arguments for p in fragments)
    assert arguments == whole.message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(arguments), NOTE["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and whole.finish_reason == "tool_calls"


@pytest.mark.slow
def test_response_format_with_tools_over_http(server, smollm2_path):
    """The openai client's tools and response_format in one request: a call of the tool, or the schema's JSON."""
    client = server.client(timeout=300)
    for question in ("What's the weather in Oslo?", "Name a city and its country."):
        choice = client.chat.completions.create(
            model=smollm2_path.name, temperature=0, max_tokens=100, tools=[WEATHER],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
            messages=[{"role": "user", "content": question}]).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            _arguments_valid(choice.message.tool_calls[0].model_dump())
        else:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), CITY)
