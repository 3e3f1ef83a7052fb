"""How `llamba serve` shares its slots' memory, as clients see it on a live server: a long prefix reused from
whichever slot holds it (with the bits a fresh server computes), a KV budget that makes requests wait rather
than run out, and a full server answering 503 while the requests it took go on untouched."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.test_server import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
# An agent's long system prompt: about 1,600 tokens of rules, sent again with every question.
SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer question {i} kindly." for i in range(130))
COUNTING = "Count with me: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # SmolLM2 counts on without ending: a long answer


def _ask(client, question: str, max_tokens: int = 12, **kwargs):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                          **kwargs)


def _answer_and_logprobs(reply) -> tuple[str, list]:
    choice = reply.choices[0]
    return choice.message.content, [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
                                    for e in choice.logprobs.content]


def _count(client, max_tokens: int):
    return client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=max_tokens, temperature=0)


def _gauges(server: Server) -> dict[str, float]:
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    return {line.split()[0][len("llamba_"):]: float(line.split()[1]) for line in lines if line.startswith("llamba_")}


def _gauge(server: Server, name: str) -> float:
    return _gauges(server)[name]


def _wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never saw {what} within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lone(smollm2_path):
    """One slot, a queue of one; its first answer (the system prompt and a question, with logprobs) is
    computed with nothing cached: the reference for reuse."""
    s = Server(smollm2_path, "-np", "1", "--queue", "1", "-c", "2048")
    reference = _ask(s.client(), "What is question 7 about?", logprobs=True, top_logprobs=3)
    yield s, reference
    s.stop()


@pytest.fixture(scope="module")
def pair(smollm2_path):
    s = Server(smollm2_path, "-np", "2", "-c", "2048")
    yield s
    s.stop()


def test_a_prefix_held_by_a_busy_slot_is_reused_with_the_same_bits(lone, pair):
    """The system prompt is cached in slot A, which is still answering; the same prompt with another question
    lands in slot B, shares A's cells, evaluates only its own tokens, and gives exactly the answer and
    logprobs a fresh server computed from nothing."""
    _, reference = lone
    assert reference.usage.prompt_tokens > 1500 and reference.usage.prompt_tokens_details.cached_tokens == 0
    client = pair.client(timeout=300)
    holder = _ask(client, "Tell me a very long story about rule 3.", max_tokens=300, stream=True)
    next(c for c in holder if c.choices and c.choices[0].delta.content)  # its prompt is in, it is decoding
    reused = _ask(client, "What is question 7 about?", logprobs=True, top_logprobs=3)
    still_busy = httpx.get(f"{pair.url}/health").json()["slots_processing"]
    holder.close()
    assert still_busy == 1, "the first request ended before the second did: the prefix was not held elsewhere"
    system_tokens = len(httpx.post(f"{pair.url}/tokenize", json={"content": SYSTEM}).json()["tokens"])
    assert reused.usage.prompt_tokens_details.cached_tokens >= system_tokens
    assert reused.usage.prompt_tokens == reference.usage.prompt_tokens
    assert _answer_and_logprobs(reused) == _answer_and_logprobs(reference)
    assert _gauge(pair, "cached_prompt_tokens_total") >= reused.usage.prompt_tokens_details.cached_tokens


def test_a_full_server_answers_503_at_once_and_its_requests_go_on(lone):
    """One slot taken, one request queued: a burst of further requests all get 503 with Retry-After while
    the accepted two are still running, and those two answer exactly as they do alone."""
    s, _ = lone
    client = s.client(timeout=300)
    alone_count = _count(client, 200).choices[0].text
    short = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    alone_answer = client.completions.create(**short).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        counting = pool.submit(lambda: _count(client, 200).choices[0].text)
        _wait_until(lambda: _gauge(s, "slots_processing") == 1, "the slot taken")
        queued = pool.submit(lambda: client.completions.create(**short).choices[0].text)
        _wait_until(lambda: _gauge(s, "queue_length") == 1, "the second request queued")
        refused = [httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
                   for _ in range(6)]
        running = not counting.done()
        assert counting.result() == alone_count and queued.result() == alone_answer
    assert running, "the burst was answered only after the running request ended"
    for reply in refused:
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "server_busy"
    assert max(r.elapsed.total_seconds() for r in refused) < 10  # no hang (the count itself takes seconds)


@pytest.fixture(scope="module")
def budgeted(smollm2_path):
    """Two slots of 256 tokens but KV memory for 372 tokens beside 128 for guesses (SmolLM2: 45 KiB a token)."""
    s = Server(smollm2_path, "-np", "2", "--queue", "4", "-c", "256", "--kv-budget", "22MiB")
    yield s
    s.stop()


def test_requests_that_do_not_fit_the_budget_wait_then_answer_as_alone(budgeted):
    client = budgeted.client(timeout=300)
    assert _gauge(budgeted, "kv_cache_budget_bytes") <= 22 * 2**20
    alone = _count(client, 200).choices[0]
    assert alone.finish_reason == "length"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: _count(client, 200).choices[0].text)
        _wait_until(lambda: _gauge(budgeted, "slots_processing") == 1, "the first request running")
        second = pool.submit(lambda: _count(client, 200).choices[0].text)
        # a slot is free, but the two reservations (prompt + 200 each) exceed the budget: the second waits
        _wait_until(lambda: _waiting_beside_a_free_slot(_gauges(budgeted)),
                    "the second request waiting for memory beside a free slot")
        assert first.result() == alone.text and second.result() == alone.text
    assert _gauge(budgeted, "kv_cache_used_bytes") <= _gauge(budgeted, "kv_cache_budget_bytes")


def _waiting_beside_a_free_slot(gauges: dict[str, float]) -> bool:
    return gauges["queue_length"] == 1 and gauges["slots_idle"] == 1


def test_max_tokens_past_the_context_stops_there_and_reserves_only_that(budgeted):
    """As llama-server: a budget larger than what the context leaves is cut to it, not refused; so two such
    requests on this budget still run one after the other, each to the end of its context."""
    client = budgeted.client(timeout=300)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda _: _count(client, 5000), range(2)))
    for reply in replies:
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 256
    assert replies[0].choices[0].text == replies[1].choices[0].text
    unbounded = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                               temperature=0)  # no max_tokens: the rest of the context
    assert unbounded.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("budget, message", [
    ("64TiB", "--kv-budget 64.00 TiB needs 64.00 TiB of f32 KV cache; this machine has"),
    ("1MiB", "--kv-budget 1.0 MiB holds 0 tokens of f32 KV cache beside 128 for guesses, fewer than one context")])
def test_a_budget_that_cannot_be_had_is_one_line_at_start(smollm2_path, budget, message):
    done = subprocess.run([sys.executable, "-m", "llamba", "serve", str(smollm2_path), "-np", "2", "-c", "512",
                           "--kv-budget", budget], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_the_engine_shares_cells_and_trims_idle_caches_only_when_that_makes_room(smollm2_path):
    """In process, step by step: a prompt extending a busy slot's holds the very same cells; a request that
    cannot get memory waits without emptying idle caches it could not use; everything finishes."""
    from llamba import Llama
    from llamba.memory.kv_cache import SPARE_CELLS
    from llamba.server.engine import Engine, Request

    llm = Llama(str(smollm2_path), n_ctx=256)
    per_cell = llm.model.new_cache(256, "f32", n_cells=1).bytes_per_cell
    engine = Engine(llm, parallel=3, kv_budget=per_cell * (300 + 3 * SPARE_CELLS))  # 300 cells to reserve
    prompt = llm.tokenize(COUNTING)

    def submit(ids, max_tokens):
        request = Request(ids, max_tokens, llm.sampler(None, None, temperature=0))
        engine.submit(request)
        engine._admit()
        return request

    def slot_of(request):
        return next(s for s in engine.slots if s.request is request)

    first = submit(prompt, 150)
    engine._step()
    second = submit(prompt + prompt[-3:], 20)
    assert second.cached_tokens == len(prompt)
    a, b = engine.cache.seq_cells(slot_of(first).sequence.seq), engine.cache.seq_cells(slot_of(second).sequence.seq)
    assert list(b) == list(a[: len(prompt)])  # shared, not copied
    while second in [s.request for s in engine.slots]:
        engine._step()
    idle = next(s for s in engine.slots if s.request is None and len(s.sequence))
    held = len(idle.sequence)
    unrelated = llm.tokenize("Tell me about the sea.")
    assert unrelated[0] != prompt[0]  # it goes to the empty slot, the least recently used
    third = submit(unrelated, 240)  # beside the first's reservation of prompt + 150, more than the 300 cells
    assert list(engine.waiting) == [third] and len(idle.sequence) == held  # trimming it could not make room
    while engine.waiting or any(s.request is not None for s in engine.slots):
        engine._admit()
        engine._step()
    assert first.generated == 150 and third.generated > 0
