"""`llamba serve` under faults: bad input of every kind is a 4xx JSON error (a fuzz of 1,200 seeded mutants of
valid chat, completion and embedding requests), the server stays correct after it, and SIGTERM stops it
gracefully (running streams finish, new requests are refused, exit 0 within the bound)."""

from __future__ import annotations

import concurrent.futures
import copy
import json
import random
import signal
import threading
import time

import httpx
import pytest

from tests.test_server import Server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 128
VALID = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2,
                             "temperature": 0},
    "/v1/completions": {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0},
    "/v1/embeddings": {"model": MODEL, "input": ["Hello there", "General Kenobi"]},
}
GARBAGE = [None, True, False, 0, -1, 3, 2**31, -(2**63), 10**30, 1e308, -1e308, 0.5, "", "x", "\u00e9\u4e2d\U0001f600",
           "\ud800", "word " * 300, [], [1, "a", None], {}, {"a": {"b": [{}]}}, [[[[[[[[[[[]]]]]]]]]]],
           [{"role": "user"}], [{"role": "wizard", "content": "hi"}], [{"role": "user", "content": [{"type": "img"}]}],
           [50000, -3], [[1, 2], [3]], "NaN"]
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream",
          "seed", "logprobs", "top_logprobs", "n", "logit_bias", "response_format", "tools", "tool_choice",
          "encoding_format", "json_schema", "grammar", "decoding", "stream_options", "max_completion_tokens",
          "frequency_penalty", "presence_penalty", "min_p", "repeat_penalty", "typical_p"]


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "-np", "4", "-c", str(N_CTX))
    yield s
    s.stop()


def _reference_answer(url: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me the capital of France."}],
            "max_tokens": 12, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200
    return reply.json()["choices"][0]["message"]["content"]


def _mutant(rng: random.Random) -> tuple[str, str, bytes, dict]:
    """(method, path, body bytes, headers): a valid request with one to three seeded faults."""
    path = rng.choice(list(VALID))
    body = copy.deepcopy(VALID[path])
    method, headers, as_text = "POST", {"content-type": "application/json"}, None
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.35:
            body[rng.choice(FIELDS)] = copy.deepcopy(rng.choice(GARBAGE))
        elif kind < 0.45 and body:
            del body[rng.choice(list(body))]
        elif kind < 0.55:
            _nested(rng, body)
        elif kind < 0.65:
            text = json.dumps(body)
            as_text = text[: rng.randrange(len(text))]  # truncated JSON
        elif kind < 0.72:
            text = json.dumps(body)
            at = rng.randrange(len(text))
            as_text = text[:at] + rng.choice(["\x00", "}", "{", '"', "\\", "\u00ff", ",", "]"]) + text[at + 1:]
        elif kind < 0.78:
            as_text = rng.choice(["", "null", "[]", "1", '"hi"', "{}", "[" * 5000, '{"a":' * 3000])
        elif kind < 0.84:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        elif kind < 0.9:
            path = rng.choice(["/v1/nothing", "/v2/chat/completions", "/v1/embeddings/x", "/%ff", "/v1/models/x"])
        elif kind < 0.95:
            headers = {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded", "bogus"])}
        else:
            body["stream"] = path != "/v1/embeddings"
    data = (as_text if as_text is not None else json.dumps(body)).encode("utf-8", "surrogatepass")
    return method, path, data, headers


def _nested(rng: random.Random, body: dict) -> None:
    """A fault deeper in the body: a message or input item replaced, or a field of a message."""
    if "messages" in body and isinstance(body["messages"], list) and body["messages"]:
        message = body["messages"][0]
        if isinstance(message, dict):
            message[rng.choice(["role", "content", "tool_calls", "name", "extra"])] = copy.deepcopy(rng.choice(GARBAGE))
            return
    if "input" in body and isinstance(body["input"], list) and body["input"]:
        body["input"][0] = copy.deepcopy(rng.choice(GARBAGE))
        return
    body[rng.choice(FIELDS)] = {"deep": [copy.deepcopy(rng.choice(GARBAGE))] * 3}


def _check(reply: httpx.Response, case: tuple) -> int:
    """Every answer is 2xx or 4xx, its body JSON (or a stream of JSON events); returns the status."""
    assert 200 <= reply.status_code < 300 or 400 <= reply.status_code < 500, (reply.status_code, reply.text, case)
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", case
        for event in events[:-1]:
            json.loads(event)
    else:
        body = reply.json()
        if reply.status_code >= 400:
            assert isinstance(body["error"]["message"], str) and body["error"]["message"], (body, case)
    return reply.status_code


def test_fuzzed_requests_get_4xx_json_and_leave_the_server_well(server):
    before = _reference_answer(server.url)
    rng = random.Random(33)
    cases = [_mutant(rng) for _ in range(1200)]
    client = httpx.Client(base_url=server.url, timeout=60)  # a hang fails the case instead of the suite

    def send(case) -> int:
        method, path, data, headers = case
        return _check(client.request(method, path, content=data, headers=headers), case)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # at most the server's slots: no 503 for a full queue
        statuses = list(pool.map(send, cases))
    seconds = time.monotonic() - started
    accepted = sum(200 <= s < 300 for s in statuses)
    print(f"{len(cases)} mutants in {seconds:.1f} s: {accepted} accepted, {len(cases) - accepted} refused (4xx)")
    assert 50 < accepted < len(cases) - 300  # the mutants reach the model as well as the checks
    assert _reference_answer(server.url) == before
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
        if "llamba_slots_processing 0.0" in metrics and "llamba_queue_length 0.0" in metrics:
            break
        time.sleep(0.1)
    assert "llamba_slots_processing 0.0" in metrics and "llamba_slots_idle 4.0" in metrics


def test_faults_by_name(server):
    """The faults the issue names, one by one, each a 4xx with OpenAI's error body."""
    chat = VALID["/v1/chat/completions"]
    cases = [
        ("POST", "/v1/chat/completions", b'{"messages": [', 400),  # malformed JSON
        ("POST", "/v1/chat/completions", json.dumps({**chat, "max_tokens": "ten"}).encode(), 400),  # wrong type
        ("POST", "/v1/chat/completions", json.dumps({**chat, "messages": {"role": "user"}}).encode(), 400),
        ("POST", "/v1/chat/completions", json.dumps({**chat, "max_tokens": 10**12}).encode(), 400),  # huge
        ("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2**31}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"prompt": "word " * 200, "max_tokens": 2}).encode(), 400),  # > ctx
        ("POST", "/v1/chat/completions", json.dumps({**chat, "messages": [{"role": "user", "content": "\ud800"}]},
                                                    ensure_ascii=True).encode(), 400),  # a lone surrogate
        ("POST", "/v1/nothing", b"{}", 404),  # unknown route
        ("GET", "/v1/chat/completions", b"", 405),  # wrong method
        ("DELETE", "/v1/models", b"", 405),
        ("POST", "/v1/embeddings", json.dumps({"input": "word " * 200}).encode(), 400),
    ]
    for method, path, data, status in cases:
        reply = httpx.request(method, f"{server.url}{path}", content=data, headers={"content-type": "application/json"})
        assert reply.status_code == status, (path, data[:80], reply.text)
        assert reply.json()["error"]["message"], reply.text
    over = httpx.post(f"{server.url}/v1/completions", json={"prompt": "word " * 200, "max_tokens": 2}).json()
    assert over["error"]["code"] == "context_length_exceeded"
    # a budget beyond the context is llama-server's and vLLM's "as much as fits": the answer stops at the context
    long = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 5000,
                                                             "temperature": 0}, timeout=300).json()
    assert long["choices"][0]["finish_reason"] == "length"
    assert long["usage"]["prompt_tokens"] + long["usage"]["completion_tokens"] <= N_CTX


COUNTING = "Count from 1 to 1000: 1, 2, 3, 4,"  # SmolLM2 keeps counting: a stream that does not end early


def _stream_lines(url: str, body: dict, seen: list, first: threading.Event) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                seen.append(line[6:])
                first.set()


def test_sigterm_lets_the_running_stream_finish_then_exits_0(smollm2_path):
    s = Server(smollm2_path, "-np", "2", "--shutdown-timeout", "60")
    seen, first = [], threading.Event()
    body = {"prompt": COUNTING, "max_tokens": 64, "temperature": 0, "stream": True}
    streaming = threading.Thread(target=_stream_lines, args=(s.url, body, seen, first))
    streaming.start()
    assert first.wait(120)
    at_signal = len(seen)
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        refused = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    except httpx.ConnectError:
        pass  # the listening socket already closed: refused too
    streaming.join(timeout=120)
    assert s.process.wait(timeout=60) == 0
    assert seen[-1] == "[DONE]" and len(seen) > at_signal + 1  # it went on after the signal, to its end
    chunks = [json.loads(line) for line in seen[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 20


def test_sigterm_cuts_what_runs_past_the_timeout(smollm2_path):
    """--shutdown-timeout 1 with a long stream in the one slot, a request queued behind it and a large
    embeddings request: after a second the stream ends with finish_reason error, the other two get 503, and
    the process exits 0."""
    s = Server(smollm2_path, "-np", "1", "--shutdown-timeout", "1", "-c", "4096")
    seen, first = [], threading.Event()
    body = {"prompt": COUNTING, "max_tokens": 4000, "temperature": 0, "stream": True}
    streaming = threading.Thread(target=_stream_lines, args=(s.url, body, seen, first))
    streaming.start()
    assert first.wait(120)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        queued = pool.submit(httpx.post, f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4},
                             timeout=60)
        many = [f"Text number {i}: " + "words to embed " * 30 for i in range(200)]  # 20,000 tokens
        embedding = pool.submit(httpx.post, f"{s.url}/v1/embeddings", json={"input": many}, timeout=60)
        time.sleep(1)
        signalled = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        assert s.process.wait(timeout=30) == 0
        waited = time.monotonic() - signalled
        for reply in (queued.result(), embedding.result()):
            assert reply.status_code == 503, reply.text
            assert "stopped" in reply.json()["error"]["message"]
    streaming.join(timeout=30)
    assert waited < 10, waited  # 1 s to finish, then the rest is cut and HTTP closes
    assert seen[-1] == "[DONE]"
    assert json.loads(seen[-2])["choices"][0]["finish_reason"] == "error"
