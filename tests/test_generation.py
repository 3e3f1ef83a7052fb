"""Generation, the Python API and chat sessions on the real SmolLM2 model."""

from __future__ import annotations

import numpy as np
import pytest

from llamba.api import Llama
from llamba.errors import LlambaError
from llamba.text.stream import StopFilter
from llamba.session import ChatSession, ChatSettings
from llamba.generation.sampling import SamplingParams

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Llama(smollm2_path, n_ctx=1024)


def _greedy_ids(llm, prompt_ids, n):
    logits = llm.logits(prompt_ids)
    out, pos = [], len(prompt_ids)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = llm.model.forward_tokens([out[-1]], pos, llm.cache)
        pos += 1
    llm.reset()
    return out


def test_greedy_generate_is_the_argmax_chain(llm):
    prompt = "The capital of France is"
    expected = llm.detokenize(_greedy_ids(llm, llm.tokenize(prompt), 12))
    assert llm.generate(prompt, max_tokens=12, **GREEDY) == expected
    assert llm.last_stats.generated_tokens == 12 and llm.last_stats.finish_reason == "length"



def test_tokens_per_step_counts_the_last_generation_only(llm):
    """The stats line's tokens per step describes the answer just given, not every answer since loading."""
    repeating = "one two three four five six seven eight. one two three four five six seven eight. one two"
    for prompt in (repeating, "The capital of France is"):
        llm.generate(prompt, max_tokens=24, decoding="prompt-lookup", **GREEDY)
        s, spec = llm.last_stats, llm.last_stats.speculation
        # the first token comes before any step; each step gives one token and its accepted guesses
        assert spec.steps < s.generated_tokens <= 1 + spec.steps + spec.accepted

def test_stop_string_spanning_tokens_is_never_printed(llm):
    prompt = "The capital of France is"
    ids = _greedy_ids(llm, llm.tokenize(prompt), 12)
    pieces = [llm.detokenize(ids[:k + 1])[len(llm.detokenize(ids[:k])):] for k in range(12)]
    k = next(i for i in range(2, 11) if len(pieces[i]) > 1 and len(pieces[i + 1]) > 1)
    stop = pieces[k][1:] + pieces[k + 1][:1]  # ends inside one token and starts inside the next
    text = llm.generate(prompt, max_tokens=12, stop=[stop], **GREEDY)
    assert stop not in text
    assert text == "".join(pieces)[: "".join(pieces).index(stop)]
    assert llm.last_stats.finish_reason == "stop"


def test_stop_filter_holds_back_partial_matches():
    f = StopFilter(["<END>"])
    assert f.feed("abc<E") == ("abc", False)
    assert f.feed("N") == ("", False)
    assert f.feed("X more") == ("<ENX more", False)
    assert f.feed("x<END>tail") == ("x", True)


def test_chat_answer_ends_at_the_turn_terminator(llm):
    out = llm.create_chat_completion([{"role": "user", "content": "Say hi."}], max_tokens=200, **GREEDY)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] < 200


def test_streamed_and_whole_completions_agree(llm):
    whole = llm.create_completion("Once upon a time", max_tokens=16, **GREEDY)
    chunks = list(llm.create_completion("Once upon a time", max_tokens=16, stream=True, **GREEDY))
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 16
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    chat = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=8, stream=True, **GREEDY))
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chat[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_second_turn_evaluates_only_new_tokens(llm):
    llm.reset()
    session = ChatSession(llm, system="You are terse.", settings=ChatSettings(SamplingParams(temperature=0), 24))
    "".join(step.text for step in session.send("What is 2+2?"))
    first = llm.last_stats
    assert first.evaluated_prompt_tokens == first.prompt_tokens  # a fresh cache: the whole prompt
    cached = llm.sequence.tokens
    "".join(step.text for step in session.send("And 3+3?"))
    second = llm.last_stats
    ids = llm.chat_prompt_ids(session.conversation()[:-1])
    common = next((i for i, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))
    assert second.evaluated_prompt_tokens == second.prompt_tokens - common
    assert second.evaluated_prompt_tokens < 20 < second.prompt_tokens


def test_interrupted_answer_keeps_the_cache_consistent(llm):
    llm.reset()
    steps = llm.stream_tokens(llm.tokenize("Count: 1, 2, 3,"), max_tokens=50, **GREEDY)
    for _ in range(5):
        next(steps)
    steps.close()
    assert len(llm.sequence) == llm.cache.n_past
    expected = llm.generate("Count: 1, 2, 3,", max_tokens=8, **GREEDY)  # reuses the cache
    llm.reset()
    assert llm.generate("Count: 1, 2, 3,", max_tokens=8, **GREEDY) == expected


def test_session_save_and_load_with_kv(llm, tmp_path):
    llm.reset()
    session = ChatSession(llm, settings=ChatSettings(SamplingParams(temperature=0), 16))
    answer = "".join(step.text for step in session.send("Name a color."))
    path = session.save(tmp_path / "chat.json", with_kv=True)
    other = ChatSession(llm)
    llm.reset()
    other.load(path)
    assert other.messages == session.messages and other.messages[-1]["content"] == answer
    assert llm.cache.n_past > 0  # the KV cache came back: no recomputation
    again = "".join(step.text for step in other.regenerate())
    assert again == answer and llm.last_stats.evaluated_prompt_tokens <= 1


def test_load_rejects_other_files(llm, tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(LlambaError, match="not a saved llamba chat session"):
        ChatSession(llm).load(bad)


def test_context_overflow_shifts_or_stops(smollm2_path):
    small = Llama(smollm2_path, n_ctx=96)
    notes = []
    session = ChatSession(small, system="Be brief.", settings=ChatSettings(SamplingParams(temperature=0), 8),
                          notify=notes.append)
    for i in range(6):
        list(session.send(f"Tell me fact number {i} about the sea, please, in a few words."))
    assert any("dropped" in n for n in notes) and session.system == "Be brief."
    session.settings.overflow = "stop"
    with pytest.raises(LlambaError, match="no longer fits"):
        for _ in range(4):
            list(session.send("Another long question about the ocean and its many waves, please answer."))


def test_bad_arguments_are_clear(llm):
    with pytest.raises(LlambaError, match="temperature"):
        llm.generate("x", temperature=-1)
    with pytest.raises(LlambaError, match="unknown option"):
        llm.generate("x", temprature=1)
    with pytest.raises(LlambaError, match="longer than the context"):
        llm.generate("word " * 2000, max_tokens=1)
