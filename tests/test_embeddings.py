"""Embeddings: `Llama.embed` / `create_embedding` and `/v1/embeddings` through the openai client, checked against
a NumPy pooling of llamba's own hidden states and against llama-cpp-python's embedding mode on the same file."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from llamba import Llama
from llamba.memory.batch import Batch
from llamba.memory.kv_cache import KVCache
from tests.test_server import Server

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n",
         "Bees make honey. " * 30, "ok"]
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Llama(smollm2_path, n_ctx=512)


@pytest.fixture(scope="module")
def server(smollm2_path):
    s = Server(smollm2_path, "-np", "2", "-c", "512")
    yield s
    s.stop()


def numpy_embedding(llm, text: str) -> np.ndarray:
    """Mean of the token rows after the output norm, scaled to unit length, computed here in float64."""
    ids = llm.tokenize(text)
    cache = KVCache.for_model(llm.model.hp, len(ids), "f32")
    hidden = llm.model.hidden_states(Batch.chain(ids, 0, logits="none"), cache).astype(np.float64)
    assert hidden.shape == (len(ids), llm.model.hp.n_embd)
    mean = hidden.sum(axis=0) / len(ids)
    return mean / np.sqrt(mean @ mean)


def test_hidden_states_are_what_the_logits_read(llm):
    """The rows embed pools are the ones the output matrix turns into logits: same last-token logits."""
    ids = llm.tokenize(TEXTS[0])
    cache = KVCache.for_model(llm.model.hp, len(ids), "f32")
    hidden = llm.model.hidden_states(Batch.chain(ids, 0, logits="none"), cache)
    output = llm.model.output  # SmolLM2's output matrix is its token table: dequantize its rows
    table = llm.model.tok_embd.gather(np.arange(llm.model.hp.n_vocab))
    assert output.kind != "f32"
    expected = table.astype(np.float64) @ hidden[-1].astype(np.float64)
    logits = llm.logits(ids)
    assert np.argmax(logits) == np.argmax(expected)
    assert np.corrcoef(logits, expected)[0, 1] > 0.999  # the kernel rounds the activations to 8 bits


def test_embed_is_mean_pooled_unit_length_and_batch_invariant(llm):
    assert llm.pooling == "mean"  # SmolLM2's file names no pooling type
    one = [np.array(llm.embed(t), np.float32) for t in TEXTS]
    together = np.array(llm.embed(TEXTS), np.float32)
    assert together.shape == (len(TEXTS), llm.model.hp.n_embd)
    for i, text in enumerate(TEXTS):
        assert np.array_equal(together[i], one[i])  # bits: alone or beside other texts
        assert np.linalg.norm(one[i]) == pytest.approx(1.0, abs=1e-6)
        assert np.allclose(one[i], numpy_embedding(llm, text), atol=2e-6)
    raw = np.array(llm.embed(TEXTS[0], normalize=False))
    assert np.allclose(raw / np.linalg.norm(raw), one[0], atol=1e-6) and np.linalg.norm(raw) > 2
    cos = together @ together.T
    assert cos[0, 0] > cos[0, 1] and cos[0, 1] < 0.99  # different texts, different vectors


def test_create_embedding_shape_and_token_input(llm):
    ids = llm.tokenize(TEXTS[1])
    out = llm.create_embedding([TEXTS[1], ids])
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1]
    assert out["usage"] == {"prompt_tokens": 2 * len(ids), "total_tokens": 2 * len(ids)}
    assert out["data"][0]["embedding"] == out["data"][1]["embedding"]  # the text and its tokens
    assert llm.embed(ids) == out["data"][0]["embedding"]


def test_embed_leaves_the_chat_cache_alone(llm):
    llm.generate("Once upon a time", max_tokens=4, temperature=0)
    held = list(llm.sequence.tokens)
    llm.embed(TEXTS)
    assert list(llm.sequence.tokens) == held


def test_bad_embed_input_is_one_error(llm):
    from llamba.errors import BadRequestError, ContextOverflowError

    for bad in ("", [], [""], [[]], [1.5], {"a": 1}, [[10**9]]):
        with pytest.raises(BadRequestError):
            llm.embed(bad)
    with pytest.raises(ContextOverflowError, match="context holds 512"):
        llm.embed("word " * 600)


def test_server_embeddings_through_the_openai_client(server, llm):
    client = server.client()
    answer = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in answer.data] == list(range(len(TEXTS)))
    vectors = np.array([d.embedding for d in answer.data], np.float32)
    # The API's vectors: the same bits when both processes run Numba's cached kernels. A test process that
    # compiled its own kernels (a fresh clone's first run) gave vectors up to 4e-4 off per component, not yet
    # explained (see the issue notes); the API's own pooling is checked against NumPy in this process above.
    assert np.allclose(vectors, np.array(llm.embed(TEXTS), np.float32), rtol=0, atol=1e-3)
    assert answer.usage.prompt_tokens == sum(len(llm.tokenize(t)) for t in TEXTS)
    single = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    assert np.array_equal(np.array(single.data[0].embedding, np.float32), vectors[0])
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    assert np.array_equal(decoded, vectors[0]) and raw["model"] == MODEL


def test_server_embeddings_bad_input_is_400(server):
    client = server.client()
    for bad in ("", [], [""], [[]], [["a"]], 5, None, [1, "a"]):
        reply = httpx.post(f"{server.url}/v1/embeddings", json={"input": bad, "model": MODEL})
        assert reply.status_code == 400, bad
        assert reply.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model=MODEL, input="word " * 600)
    assert too_long.value.code == "context_length_exceeded"
    assert httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL}).status_code == 400  # no input
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_embeddings_agree_with_llama_cpp(llm, smollm2_path):
    """llama-cpp-python's embedding mode on the same file: it pools none for a generation model unless told,
    so it is told mean, and to normalize (its embed's default is not to). Both round activations their own way:
    the vectors agree in direction, not in bits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    peer = llama_cpp.Llama(str(smollm2_path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                           n_ctx=512, n_batch=512, verbose=False)
    assert [len(peer.tokenize(t.encode())) for t in TEXTS] == [len(llm.tokenize(t)) for t in TEXTS]
    theirs = np.array(peer.embed(TEXTS, normalize=True))
    ours = np.array(llm.embed(TEXTS))
    cosines = (theirs * ours).sum(axis=1)
    assert cosines.min() >= 0.999, cosines  # measured 0.99974 .. 0.99997
    others = theirs @ ours.T - np.diag(cosines)
    assert others.max() < cosines.min() - 0.01  # each text nearest its own vector, not just all alike


def test_server_embeddings_beside_a_stream(server):
    """An embeddings request runs a forward at a time between the slots' steps: a stream decoded meanwhile
    gives its lone answer, and the vectors are the lone ones."""
    import concurrent.futures

    client = server.client(timeout=300)
    ask = dict(model=MODEL, prompt="Count from 1 to 100: 1, 2, 3,", max_tokens=48, temperature=0)
    alone = client.completions.create(**ask).choices[0].text
    many = TEXTS * 8  # several forwards' worth
    lone = np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=TEXTS).data], np.float32)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(lambda: "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True)))
        vectors = pool.submit(lambda: client.embeddings.create(model=MODEL, input=many))
        assert stream.result() == alone
        got = np.array([d.embedding for d in vectors.result().data], np.float32)
    assert np.array_equal(got, np.tile(lone, (8, 1)))


def test_pooling_follows_the_file():
    from llamba.errors import UnsupportedError
    from llamba.generation.embedding import pool, pooling_named, unit_length

    assert pooling_named(None) == "mean"  # a generation model names none
    assert pooling_named(3) == "last"  # Qwen3-Embedding's files
    assert pooling_named(2) == "cls"
    assert pooling_named(0) == "mean"  # none: what llama-server asks --pooling for
    with pytest.raises(UnsupportedError, match="llama.pooling_type = 4 .rank."):
        pooling_named(4, "llama")
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(pool(rows, "mean"), [4, 5, 6, 7])
    assert np.array_equal(pool(rows, "cls"), rows[0]) and np.array_equal(pool(rows, "last"), rows[2])
    assert np.allclose(unit_length(np.array([[3, 4], [0, 0]], np.float32)), [[0.6, 0.8], [0, 0]], atol=1e-7)
