"""The serving engine: N slots decoded together, one forward per step over every active sequence.

Each slot is a sequence of the shared KV cache (its own cells, its own sampler, its own text stream). A step
gathers one token from every decoding slot and a piece of one waiting prompt into a single batch, so the
weights are read once for all of them (the batch mechanism of memory/batch.py). The kernels are batch
invariant, so a request's tokens are the same whether it was served alone or beside others.

A request that arrives when every slot is busy waits in a bounded queue; the next step after a slot frees,
it takes the free slot whose cached tokens share the longest prefix with its prompt (then the least recently
used), and only the rest of the prompt is evaluated (a chat's next turn runs only its new message). When
another slot, busy or idle, holds a longer prefix of the prompt (agents resend one long system prompt and
their tools), the new slot shares those cells: the cache's cells may belong to several sequences, and
attention reads them in position order, so the reused keys and values are the bits the prompt would compute.

The KV memory of all slots is one budget, allocated at start. Each request reserves the cells its prompt and
max_tokens can fill beyond what it shares; one that does not fit yet waits at the head of the queue while
idle slots' caches are trimmed, least recently used first, and running requests never run out. The engine
runs in one thread; requests talk to it through thread-safe queues, and cancelling one frees its slot at the
next step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import BadRequestError, ContextOverflowError, LlambaError, OverloadError
from ..generation.decoding import DECODERS, Speculation, make_speculation
from ..generation.decoding.speculative import Draft, guess, settle
from ..generation.sampling import Sampler
from ..memory.batch import MAX_SEQUENCES, Batch
from ..memory.kv_cache import SPARE_CELLS, KVCache, available_memory
from ..memory.sequence import Sequence
from ..text.stream import TextStream

PREFILL_CHUNK = 256  # prompt tokens per step: a long prompt never stalls the running streams for long


@dataclass
class Event:
    """What a request hears from the engine: a token with its text, then one final event (finish_reason set,
    or error set)."""

    text: str = ""
    token: int = -1
    logprobs: dict | None = None  # {"logprob": float, "top": [(token, logprob), ...]}
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int | None  # None: to the end of the context
    sampler: Sampler
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's and the n best
    decoding: str = "greedy"  # a name from generation/decoding: guesses checked in the same batch
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    deliver: Callable[[Event], None] | None = None  # called from the engine thread; default: put in events
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    submitted: float = field(default_factory=time.perf_counter)
    first_token_seconds: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, event: Event) -> None:
        (self.deliver or self.events.put)(event)


@dataclass
class Job:
    """Work besides the slots (an embeddings request): step() runs on the engine's thread before each of the
    slots' steps until it returns True (done; it delivers its own result); end(error) if the engine stops first."""

    step: Callable[[], bool]
    end: Callable[[str], None]


@dataclass
class _Slot:
    sequence: Sequence  # the tokens the cache holds for this slot's sequence
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # tokens to evaluate next
    history: list[int] = field(default_factory=list)  # prompt + generated (for penalties)
    text: TextStream | None = None
    speculation: Speculation | None = None
    decoders: dict = field(default_factory=dict)  # decoding name -> this slot's Speculation (a draft's cache)
    last_used: float = 0.0
    reserved: int = 0  # positions the request may fill (prompt + max_tokens): its cells are set aside

    @property
    def outstanding(self) -> int:
        """Cells the running request may still take."""
        return max(0, self.reserved - len(self.sequence)) if self.request is not None else 0


GUESSING = tuple(d for d in DECODERS if not d.startswith("draft:"))  # offered without loading a model


class Engine:
    def __init__(self, llm, parallel: int = 4, max_queue: int = 16, draft: str | None = None,
                 kv_budget: int | None = None):
        """draft: a `draft:MODEL` decoding the server offers (its model loaded once, a cache per slot).
        kv_budget: bytes of KV cache for all slots together (None: a whole context per slot)."""
        if not 1 <= parallel <= MAX_SEQUENCES:
            raise LlambaError(f"--parallel must be in 1..{MAX_SEQUENCES} (got {parallel})")
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.decoders = GUESSING + ((draft,) if draft else ())
        self._draft_model = self._load_draft(draft) if draft else None
        self.n_ctx = llm.n_ctx
        self.guess_cells = SPARE_CELLS * parallel  # a step's guesses, held until the rejected are dropped
        self.cache = self._allocate_cache(llm.cache.kv_type, parallel, kv_budget)
        self.slots = [_Slot(Sequence(self.cache, seq)) for seq in range(parallel)]
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()
        self.counters = {"requests": 0, "prompt_tokens": 0, "evaluated_prompt_tokens": 0, "cached_prompt_tokens": 0,
                         "generated_tokens": 0}
        self.tokens_per_second = 0.0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.jobs: deque[Job] = deque()  # work besides the slots (embeddings), run between steps

    # ------------------------------------------------------------------------------------- outside

    def start(self) -> None:
        """Run the engine in a thread of its own (`run` on the main thread decodes faster)."""
        self._thread = threading.Thread(target=self.run, name="llamba-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _allocate_cache(self, kv_type: str, parallel: int, kv_budget: int | None) -> KVCache:
        """The cache of every slot together, its pages committed once at start: kv_budget bytes, or a whole
        context per slot. A budget this machine cannot give is refused here, naming the figure, rather than
        met as an out-of-memory kill when the cache fills."""
        per_cell = self.model.new_cache(self.n_ctx, kv_type, n_cells=1).bytes_per_cell
        n_cells = kv_budget // per_cell if kv_budget else parallel * self.n_ctx + self.guess_cells
        figure = f"--kv-budget {_size(kv_budget)}" if kv_budget else f"-c {self.n_ctx} x --parallel {parallel}"
        if n_cells - self.guess_cells < self.n_ctx:
            raise LlambaError(f"{figure} holds {max(0, n_cells - self.guess_cells)} tokens of {kv_type} KV cache "
                              f"beside {self.guess_cells} for guesses, fewer than one context of {self.n_ctx} "
                              "tokens: raise it or lower -c")
        available = available_memory()
        if available is not None and n_cells * per_cell > available:
            raise LlambaError(f"{figure} needs {_size(n_cells * per_cell)} of {kv_type} KV cache; this machine has "
                              f"{_size(available)} available (lower it, or choose a smaller --kv-type)")
        try:
            cache = self.model.new_cache(self.n_ctx, kv_type, n_cells=n_cells)
            cache.commit()
        except MemoryError:
            raise LlambaError(f"{figure}: {_size(n_cells * per_cell)} of KV cache could not be allocated") from None
        return cache

    def submit(self, request: Request) -> Request:
        if request.decoding not in self.decoders:
            raise BadRequestError(f"decoding {request.decoding!r} is not offered here (offered: {', '.join(self.decoders)})")
        self._check_length(request)
        with self._wake:
            if len(self.waiting) >= self.max_queue + self.free_slots():
                raise OverloadError("the server is busy: every slot is taken and the queue is full")
            self.waiting.append(request)
            self.counters["requests"] += 1
            self._wake.notify()
        return request

    def call(self, job: Job) -> None:
        """Run job's steps on the engine's thread (the model is driven from that thread only), one before each
        of the slots' steps until it is done; a full queue is an OverloadError, as for requests."""
        with self._wake:
            if len(self.jobs) >= self.max_queue + len(self.slots):
                raise OverloadError("the server is busy: too much work is waiting")
            self.jobs.append(job)
            self._wake.notify()

    def idle(self) -> bool:
        """Nothing running, waiting or asked: what a graceful stop waits for."""
        return not self.busy_slots and not self.waiting and not self.jobs

    def end_all(self, error: str) -> None:
        """End every request still running or waiting with this error (a stop whose time ran out); call it
        from the engine's thread once `run` has returned."""
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, error=error)
        while self.waiting:
            self.waiting.popleft().send(Event(finish_reason="error", error=error))
        while self.jobs:
            self.jobs.popleft().end(error)

    def _load_draft(self, decoding: str):
        from ..models import load_transformer
        from ..store import resolve_model

        if not decoding.startswith("draft:") or not decoding[len("draft:"):]:
            raise BadRequestError(f"unknown decoding {decoding!r} (choose from {', '.join(DECODERS)})")
        return load_transformer(resolve_model(decoding[len("draft:"):]))

    def _speculation(self, slot: _Slot, decoding: str) -> Speculation | None:
        """The slot's decoder for `decoding`, made once per slot: a draft model's cache stays with its slot."""
        if decoding not in slot.decoders:
            slot.decoders[decoding] = make_speculation(decoding, self.model, self.n_ctx, self.cache.kv_type,
                                                       load_model=lambda _: self._draft_model)
        return slot.decoders[decoding]

    def free_slots(self) -> int:
        return sum(slot.request is None for slot in self.slots)

    @property
    def busy_slots(self) -> int:
        return len(self.slots) - self.free_slots()

    def _check_length(self, request: Request) -> None:
        """The prompt must fit one slot's context; max_tokens past what is left of it (or none) stops there, as
        llama-server's does (agents send budgets larger than a local context), and only that much is reserved."""
        prompt = len(request.prompt_ids)
        if prompt >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {prompt} tokens; the context holds {self.n_ctx}")
        room = self.n_ctx - prompt
        request.max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)

    # ------------------------------------------------------------------------------------- the loop

    def run(self, keep_running: Callable[[], bool] = lambda: True) -> None:
        """Serve requests in the calling thread until `stop()`, or until `keep_running()` turns false.

        The server calls this on the main thread: OpenMP (Numba's threading layer) keeps the kernel threads of
        the main thread's parallel regions spinning between regions, while a team started from another thread
        sleeps and is woken for each of the hundreds of regions a token takes; decoding measured 2x slower."""
        while True:
            with self._wake:
                while not self._stopping and self.idle() and keep_running():
                    self._wake.wait(timeout=0.5)
                if self._stopping or not keep_running():
                    return
                self._admit()
                jobs, self.jobs = list(self.jobs), deque()
            again = [job for job in jobs if not job.step()]
            with self._wake:
                self.jobs.extendleft(reversed(again))
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, never the server
                for slot in self.slots:
                    if slot.request is not None:
                        self._finish(slot, error=f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        """Give waiting requests, in order, free slots and the memory they reserve; the first that finds
        neither waits (and those behind it)."""
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                continue
            free = [slot for slot in self.slots if slot.request is None]
            if not free:
                return
            slot = max(free, key=lambda s: (s.sequence.common_prefix(request.prompt_ids), -s.last_used))
            reused = self._reuse_prefix(slot, request.prompt_ids)
            if not self._make_room(len(request.prompt_ids) + request.max_tokens - reused, keep=slot):
                return
            self.waiting.popleft()
            self._assign(slot, request, reused)

    def _reuse_prefix(self, slot: _Slot, prompt: list[int]) -> int:
        """Leave in the slot the longest prefix of the prompt any slot holds (its own, or another's cells
        shared); returns its length. The prompt's last token is always evaluated: its logits are needed."""
        limit = len(prompt) - 1
        own = min(slot.sequence.common_prefix(prompt), limit)
        donor = max(self.slots, key=lambda s: s.sequence.common_prefix(prompt))
        shared = min(donor.sequence.common_prefix(prompt), limit)
        if shared > own:
            slot.sequence.share(donor.sequence, shared)
            return shared
        slot.sequence.keep(own)
        return own

    def _make_room(self, cells: int, keep: _Slot) -> bool:
        """Whether `cells` cells are free beyond what running requests and guesses have set aside, after
        trimming idle slots' caches (least recently used first, from their ends; never `keep`'s). Nothing is
        trimmed when even all of them could not make the room: a request waiting on running ones spares them."""
        idle = [s for s in self.slots if s.request is None and s is not keep]
        if cells - self._unclaimed_cells() > sum(len(s.sequence) for s in idle):
            return False
        while (short := cells - self._unclaimed_cells()) > 0:
            idle = [s for s in idle if len(s.sequence)]
            if not idle:  # what is left of them is shared with running requests
                return False
            oldest = min(idle, key=lambda s: s.last_used)
            oldest.sequence.keep(len(oldest.sequence) - short)  # shared cells stay: the loop trims on if so
        return True

    def _unclaimed_cells(self) -> int:
        return self.cache.free_cells - self.guess_cells - sum(slot.outstanding for slot in self.slots)

    def _assign(self, slot: _Slot, request: Request, reused: int) -> None:
        prompt = request.prompt_ids
        slot.request, slot.pending, slot.history = request, list(prompt[reused:]), list(prompt)
        slot.reserved = len(prompt) + request.max_tokens
        request.cached_tokens = reused
        slot.text = TextStream(self.tokenizer, request.stop)
        slot.speculation = self._speculation(slot, request.decoding)
        if slot.speculation is not None:
            slot.speculation.start()
        self.counters["prompt_tokens"] += len(prompt)
        self.counters["evaluated_prompt_tokens"] += len(prompt) - reused
        self.counters["cached_prompt_tokens"] += reused

    def _step(self) -> None:
        """One forward: every decoding slot's next token, plus up to PREFILL_CHUNK tokens of prompts."""
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled.is_set():
                self._finish(slot, reason="cancelled")
        parts, owners, budget = [], [], PREFILL_CHUNK
        for slot in self.slots:
            if slot.request is None:
                continue
            draft = None
            if len(slot.pending) == 1 and slot.request.generated:  # decoding: the token and any guesses
                draft = self._guesses(slot)
                take = slot.pending + draft.tokens
                parts.append(draft.batch(slot.pending[0], len(slot.sequence), slot.sequence.seq))
            elif budget > 0 or len(slot.pending) == 1:  # a prompt, a chunk at a time
                take = slot.pending[: max(budget, 1)]
                budget -= len(take)
                wanted = "last" if len(take) == len(slot.pending) else "none"
                parts.append(Batch.chain(take, len(slot.sequence), slot.sequence.seq, logits=wanted))
            else:
                continue
            owners.append((slot, take, len(take) >= len(slot.pending), draft))
        if not parts:
            return
        t0 = time.perf_counter()
        logits = self.model.forward(Batch.join(parts), self.cache, exact=True)  # same bits alone or not
        seconds = time.perf_counter() - t0
        cells = self.cache.last_cells
        row = at = produced = 0
        for slot, taken, done, draft in owners:
            slot.last_used = time.perf_counter()
            at += len(taken)
            if not done:
                slot.sequence.extend(taken)
                slot.pending = slot.pending[len(taken):]
                continue
            rows = logits[row : row + len(taken) if draft is not None else row + 1]
            row += len(rows)
            produced += self._accept(slot, taken, draft, rows, cells[at - len(taken) : at], seconds)
        self.counters["generated_tokens"] += produced
        self.tokens_per_second = produced / max(seconds, 1e-9)

    def _guesses(self, slot: _Slot) -> Draft:
        """The tokens a slot's decoder guesses will follow its pending one (none for plain decoding)."""
        spec, request = slot.speculation, slot.request
        if spec is None:
            return Draft([])
        room = min(request.max_tokens - request.generated - 1, self.n_ctx - 2 - len(slot.sequence))
        return guess(spec, slot.history, room, request.sampler)

    def _accept(self, slot: _Slot, taken: list[int], draft: Draft | None, rows: np.ndarray, cells: np.ndarray,
                seconds: float) -> int:
        """Keep the guesses the target agrees with (speculative sampling), drop the rest from the cache, and
        send every token gained; returns how many were sent."""
        request = slot.request
        if slot.speculation is not None and draft is not None:
            verdict = settle(slot.speculation, self.cache, cells, draft, rows, request.sampler, slot.history,
                             seconds)
            slot.sequence.extend(taken[i] for i in verdict.kept)
            tokens, rows = verdict.accepted + [verdict.following], rows[verdict.kept]
        else:
            slot.sequence.extend(taken)
            tokens = [request.sampler.sample(rows[0], slot.history)]
        slot.pending = []
        for sent, (token, logits) in enumerate(zip(tokens, rows), 1):
            if not self._emit(slot, token, logits):
                return sent
        return len(tokens)

    def _emit(self, slot: _Slot, token: int, logits: np.ndarray) -> bool:
        """Send a slot's next token and its text; finish the request when it ends (returns False then)."""
        request = slot.request
        request.generated += 1
        if request.first_token_seconds is None:
            request.first_token_seconds = time.perf_counter() - request.submitted
        logprobs = _logprobs(logits, token, request.top_logprobs) if request.top_logprobs is not None else None
        request.send(Event(slot.text.push(token), token, logprobs))
        if slot.text.finish_reason:  # an end-of-generation token or a stop string
            self._finish(slot)
            return False
        slot.history.append(token)
        if request.generated >= request.max_tokens or len(slot.sequence) + 1 >= self.n_ctx:
            self._finish(slot, reason="length")
            return False
        slot.pending = [token]
        return True

    def _finish(self, slot: _Slot, reason: str = "stop", error: str | None = None) -> None:
        """End the slot's request: the text still held back, then the finish event (reason, or the error)."""
        request = slot.request
        if error is None and slot.text is not None:
            tail = slot.text.finish(reason)
            if tail:
                request.send(Event(tail))
            reason = slot.text.finish_reason
        request.send(Event(finish_reason=reason if error is None else "error", error=error))
        slot.request, slot.pending = None, []
        if error is not None:  # the cells of a failed step may be half written: start this slot afresh
            slot.sequence.keep(0)


def _logprobs(logits: np.ndarray, token: int, n_top: int) -> dict:
    z = logits.astype(np.float64)
    log_total = z.max() + np.log(np.exp(z - z.max()).sum())
    top = np.argsort(-z)[:n_top] if n_top else np.array([], np.int64)
    return {"logprob": float(z[token] - log_total), "top": [(int(t), float(z[t] - log_total)) for t in top]}


def _size(n_bytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes / 2**20:.1f} MiB"
