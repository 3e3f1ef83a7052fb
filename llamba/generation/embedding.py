"""Embeddings: each text's final hidden states pooled into one vector, as llama.cpp's embedding mode makes them.

llama.cpp pools t_embd, the residual stream after the output norm (the row the output matrix would read), the
way the GGUF's `<arch>.pooling_type` says: 1 mean over the tokens, 2 the first token (cls), 3 the last token;
then llama-server scales it to unit length (its --embd-normalize default, 2: Euclidean). A generation model's
file names no pooling, which llama.cpp reads as none (llama-cpp-python's pooling_type() on SmolLM2: 0), and
llama-server then refuses /v1/embeddings ("Pooling type 'none' is not OAI compatible", its
handle_embeddings_impl) until started with `--pooling mean`: we take mean for such a file, what that flag gives.

The texts are evaluated in a KV cache of their own (so serving or chatting keeps its cache), several texts
side by side in one batch, each its own sequence. The forward is exact, so a text's vector is bit-identical
alone or beside others.
"""

from __future__ import annotations

import numpy as np

from ..errors import BadRequestError, ContextOverflowError, UnsupportedError
from ..memory.batch import MAX_SEQUENCES, Batch
from ..memory.kv_cache import KVCache, SPARE_CELLS

POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}  # llama.cpp's enum llama_pooling_type
DEFAULT_POOLING = "mean"
CHUNK = 256  # tokens per forward, as the server's prefill: a long text never needs its whole attention at once
GROUP_TOKENS = 4096  # texts evaluated in one cache: bounds its memory (SmolLM2: 46 KB of f32 K/V a token)


def pooling_named(value, arch: str = "this model") -> str:
    """How to pool, from the file's `<arch>.pooling_type` value (None when absent): mean when it says nothing or
    none (see the module's docstring)."""
    name = POOLING_TYPES.get(int(value), "unknown") if isinstance(value, (int, np.integer)) else DEFAULT_POOLING
    if name == "none":
        return DEFAULT_POOLING
    if name not in ("mean", "cls", "last"):
        raise UnsupportedError(f"{arch}.pooling_type = {value} ({name}) is not an embedding pooling llamba has")
    return name


def pool(hidden: np.ndarray, how: str) -> np.ndarray:
    """One text's hidden states [n_tokens, n_embd] -> its vector [n_embd] (float32)."""
    if how == "mean":
        return hidden.astype(np.float64).mean(axis=0).astype(np.float32)
    return hidden[0 if how == "cls" else -1].copy()


def unit_length(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to Euclidean length 1 (a zero row stays zero), as llama.cpp's common_embd_normalize."""
    norms = np.sqrt((vectors.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def embed_tokens(model, texts: list[list[int]], how: str, n_ctx: int, normalize: bool = True) -> np.ndarray:
    """The pooled vectors [n_texts, n_embd] of token lists, each at most n_ctx tokens."""
    job = EmbeddingJob(model, texts, how, n_ctx, normalize)
    while not job.step():
        pass
    return job.vectors


class EmbeddingJob:
    """Token lists to embed, a forward at a time: `step()` runs one and says whether the vectors are done, so
    a server can decode its streams between the forwards of a large request instead of stalling them."""

    def __init__(self, model, texts: list[list[int]], how: str, n_ctx: int, normalize: bool = True):
        for i, tokens in enumerate(texts):
            if not tokens:
                raise BadRequestError(f"input {i} is empty")
            if len(tokens) > n_ctx:
                raise ContextOverflowError(f"input {i} has {len(tokens)} tokens; the context holds {n_ctx}")
        self.vectors: np.ndarray | None = None  # [n_texts, n_embd] once done
        self._forwards = self._run(model, texts, how, normalize)

    def step(self) -> bool:
        next(self._forwards, None)
        return self.vectors is not None

    def _run(self, model, texts: list[list[int]], how: str, normalize: bool):
        out = np.empty((len(texts), model.hp.n_embd), np.float32)
        for group in _groups(texts):
            hidden = yield from _hidden_states(model, [texts[i] for i in group])
            for i, rows in zip(group, hidden):
                out[i] = pool(rows, how)
        self.vectors = unit_length(out) if normalize else out


def _hidden_states(model, texts: list[list[int]]):
    """Each text's final hidden states [n_tokens, n_embd] (the generator's return value, a forward per step),
    the texts side by side as sequences of one fresh cache, CHUNK tokens a forward (the next texts' first
    pieces join once the earlier ones are done)."""
    cache = KVCache.for_model(model.hp, max(map(len, texts)), "f32", sum(map(len, texts)) + SPARE_CELLS)
    done = [0] * len(texts)
    rows: list[list[np.ndarray]] = [[] for _ in texts]
    while any(d < len(t) for d, t in zip(done, texts)):
        parts, owners, budget = [], [], CHUNK
        for seq, tokens in enumerate(texts):
            if done[seq] < len(tokens) and budget > 0:
                piece = tokens[done[seq] : done[seq] + budget]
                parts.append(Batch.chain(piece, done[seq], seq, logits="none"))
                owners.append((seq, len(piece)))
                done[seq] += len(piece)
                budget -= len(piece)
        h = model.hidden_states(Batch.join(parts), cache)
        at = 0
        for seq, n in owners:
            rows[seq].append(h[at : at + n])
            at += n
        yield
    return [np.concatenate(r) for r in rows]


def _groups(texts: list[list[int]]) -> list[list[int]]:
    """The texts' indices in runs sharing one cache: at most MAX_SEQUENCES texts and, unless one text alone is
    longer, GROUP_TOKENS tokens."""
    groups, tokens = [[]], 0
    for i, text in enumerate(texts):
        if groups[-1] and (len(groups[-1]) == MAX_SEQUENCES or tokens + len(text) > GROUP_TOKENS):
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += len(text)
    return groups
