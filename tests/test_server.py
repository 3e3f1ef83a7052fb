"""`llamba serve` as users reach it: a real server on a loopback port, the `openai` package as the client."""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llamba", "serve", str(model_path), "--port", str(self.port), "-c", "1024", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the server did not come up")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def stop(self) -> None:
        self.process.terminate()
        assert self.process.wait(timeout=30) == 0  # SIGTERM shuts the server down cleanly


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "-np", "4")
    yield s
    s.stop()


def _chat(client, question: str, max_tokens: int, **kwargs):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", temperature=0,
                                          messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                                          **kwargs)


def test_chat_and_completion(server):
    client = server.client()
    answer = _chat(client, "Tell me the capital of France.", 20)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 10 and 0 < answer.usage.completion_tokens < 20
    done = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="The capital of France is",
                                     max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert done.choices[0].text.startswith(" Paris")


def test_streaming_equals_whole_answer_with_usage_last(server):
    client = server.client()
    whole = _chat(client, "Name three colours.", 24).choices[0].message.content
    chunks = list(_chat(client, "Name three colours.", 24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_stop_strings_cut_the_text(server):
    client = server.client()
    free = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="Count: one, two, three,",
                                     max_tokens=12, temperature=0).choices[0]
    assert "," in free.text
    cut = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="Count: one, two, three,",
                                    max_tokens=12, temperature=0, stop=[","]).choices[0]
    assert cut.finish_reason == "stop" and "," not in cut.text and free.text.startswith(cut.text)


def test_logprobs_are_the_model_distribution(server):
    answer = _chat(server.client(), "Say hello.", 5, logprobs=True, top_logprobs=3).choices[0]
    entries = answer.logprobs.content
    assert len(entries) >= 1
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    completion = server.client().completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt="Hello",
                                                   max_tokens=3, temperature=0, logprobs=2).choices[0]
    assert len(completion.logprobs.tokens) == 3 and all(len(t) == 2 for t in completion.logprobs.top_logprobs)
    assert "".join(completion.logprobs.tokens) == completion.text


def test_bad_requests_are_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _chat(client, "hi", 4, extra_body={"temperature": 5})
    with pytest.raises(openai.BadRequestError, match="n"):
        _chat(client, "hi", 4, n=2)
    with pytest.raises(openai.BadRequestError, match="context") as overflow:
        _chat(client, "word " * 1500, 4)
    assert overflow.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="decoding") as unknown:
        _chat(client, "hi", 4, extra_body={"decoding": "nonsense"})
    assert unknown.value.code is None
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    for body in ("{not json", '{"messages": "hi"}', '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}',
                 '{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', '{"messages": []}'):
        reply = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400, body
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_models_tokenize_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    tokens = httpx.post(f"{server.url}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("llamba_requests_total", "llamba_generated_tokens_total", "llamba_queue_length", "llamba_tokens_per_second"):
        assert name in metrics


QUESTIONS = ["Tell me the capital of France.", "Name three colours.", "What is two plus two?", "Say hello.",
             "Write a haiku about rain.", "List four fruits.", "What do bees make?", "Describe a cat in one line.",
             "Why is the sky blue?", "Give me a word that rhymes with tree."]


def test_many_clients_get_what_they_would_alone(server):
    """8 clients x 10 requests of mixed lengths, some streamed, some dropped halfway: every finished answer is
    the one the same request gets alone (batch invariance), and no slot is left taken."""
    client = server.client(timeout=300)
    lengths = [8, 24, 40]
    alone = {(q, n): _chat(client, q, n).choices[0].message.content for q in QUESTIONS for n in lengths}

    def worker(w: int) -> list[tuple]:
        results = []
        for i in range(10):
            q, n = QUESTIONS[(w + i) % len(QUESTIONS)], lengths[(w * 3 + i) % len(lengths)]
            if (w + i) % 4 == 0:  # stream, and hang up after a few chunks
                stream = _chat(client, q, n, stream=True)
                for k, _ in enumerate(stream):
                    if k == 3:
                        break
                stream.close()
            elif (w + i) % 4 == 1:
                chunks = _chat(client, q, n, stream=True)
                results.append((q, n, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
            else:
                results.append((q, n, _chat(client, q, n).choices[0].message.content))
        return results

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        finished = [r for rs in pool.map(worker, range(8)) for r in rs]
    assert len(finished) == 60
    for q, n, text in finished:
        assert text == alone[(q, n)], (q, n)
    deadline = time.time() + 10
    while httpx.get(f"{server.url}/health").json()["slots_processing"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "slots_idle": 4, "slots_processing": 0}


def _wait_for_idle_slot(s, headers: dict, timeout: float = 30.0) -> None:
    """Until /metrics shows a free slot: a closed stream frees its slot at the next decode step, which on a
    busy machine can take longer than any fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = httpx.get(f"{s.url}/metrics", headers=headers).text.splitlines()
        if any(line.startswith("llamba_slots_idle ") and float(line.split()[1]) >= 1 for line in lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"no slot came free within {timeout} s of the client closing its stream")


def test_full_server_answers_503_and_keys_are_checked(smollm2_path):
    s = Server(smollm2_path, "-np", "1", "--queue", "0", "--api-key", "secret")
    try:
        with pytest.raises(openai.AuthenticationError):
            _chat(s.client(api_key="wrong"), "hi", 4)
        client = s.client(api_key="secret")
        busy = _chat(client, "Write a long story about a dragon.", 200, stream=True)
        next(iter(busy))  # the one slot is now taken
        reply = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           headers={"authorization": "Bearer secret"})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "server_busy"
        busy.close()
        _wait_for_idle_slot(s, headers={"authorization": "Bearer secret"})
        assert "Paris" in _chat(client, "Tell me the capital of France.", 20).choices[0].message.content
    finally:
        s.stop()


def test_next_chat_turn_evaluates_only_its_new_tokens(server):
    def evaluated() -> float:
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return next(float(line.split()[1]) for line in lines if line.startswith("llamba_evaluated_prompt_tokens_total"))

    client = server.client()
    turn = [{"role": "user", "content": "My name is Ada. Remember it, please."}]
    first = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", messages=turn, max_tokens=16,
                                           temperature=0)
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "What is my name?"}]
    before = evaluated()
    second = client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", messages=turn, max_tokens=8,
                                            temperature=0)
    assert evaluated() - before < second.usage.prompt_tokens - first.usage.prompt_tokens + 16


def test_guessing_ahead_per_request_gives_the_same_answers(server):
    """Each decoder checks its guesses (lookahead: a tree and its window) in the slot's share of the batch,
    beside other requests: the same tokens as plain decoding."""
    client = server.client(timeout=300)
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    questions = [f"Repeat this code exactly:\n\n{code}", QUESTIONS[0], QUESTIONS[2]]
    plain = [_chat(client, q, 40).choices[0].message.content for q in questions]
    for decoding in ("prompt-lookup", "lookahead", "self-spec", "auto"):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            guessed = list(pool.map(lambda q: _chat(client, q, 40, extra_body={"decoding": decoding}), questions))
        assert [g.choices[0].message.content for g in guessed] == plain, decoding
    with pytest.raises(openai.BadRequestError, match="decoding"):
        _chat(client, questions[0], 4, extra_body={"decoding": "draft:other.gguf"})


def test_a_taken_port_is_one_line_and_terminate_stops_cleanly(server, smollm2_path):
    second = subprocess.run([sys.executable, "-m", "llamba", "serve", str(smollm2_path), "--port", str(server.port)],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert second.stderr.strip().count("\n") == 0 and "cannot serve on" in second.stderr
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # the first one is untouched


def test_a_draft_model_guesses_for_every_slot(server, smollm2_path):
    """--decoding draft:MODEL: the draft model is loaded once, each slot keeps its own draft cache; several
    concurrent requests answer exactly as the greedy server does."""
    questions = ["Tell me the capital of France.", "Name three colours.", "What is 2 + 2?"]
    plain = [_chat(server.client(), q, 24).choices[0].message.content for q in questions]
    drafted = Server(smollm2_path, "-np", "2", "--decoding", f"draft:{smollm2_path}")
    try:
        client = drafted.client()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda q: _chat(client, q, 24).choices[0].message.content, questions))
        assert answers == plain
        with pytest.raises(openai.BadRequestError, match="not offered"):
            _chat(client, questions[0], 4, extra_body={"decoding": "draft:other.gguf"})
    finally:
        drafted.stop()
    bad = subprocess.run([sys.executable, "-m", "llamba", "serve", str(smollm2_path), "--decoding", "sideways"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "unknown decoding 'sideways'" in bad.stderr
