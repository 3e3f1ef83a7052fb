"""How many threads the kernels use: at most what the user allowed, and per forward what measures fastest.

A laptop is never idle. When other processes hold the cores, a parallel region's threads wait for one
another at its closing barrier while the core one of them needs runs something else; with a few hundred
regions per token, a token that takes 10 ms on a quiet machine then takes 100-200 ms. One thread has no one
to wait for: with one busy background process a token at one thread took 8.5 ms where two threads took
15.6 ms (median) and up to 185 ms. So every model keeps a `ThreadGovernor` that measures what a forward
costs at each thread count it may use (the limit, then halves down to 1), per size of batch (a size not
yet measured starts from what the nearest measured size found), takes the cheapest, and now and then tries
the others again, spending at most PROBE_SHARE of the time on those tries, so that a machine that has
quietened down gets its cores back.

Every kernel computes each output in one thread in a fixed order, so the thread count changes speed only,
never a bit of the results (tested).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import numba

_limit = 1
_in_force = threading.local()  # what this Python thread last set (Numba's count is per thread too)


def set_threads(n: int | None) -> int:
    """Use at most n threads for the kernels (default: every core); returns the limit in force.

    BLAS stays on one thread: no hot path uses it, and its threads would spin against Numba's."""
    global _limit
    n = n or os.cpu_count() or 1
    _limit = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    _use(_limit)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:  # BLAS keeps its own default
        pass
    return _limit


def thread_limit() -> int:
    return _limit


def _use(n: int) -> None:
    numba.set_num_threads(n)
    _in_force.count = n


def kernel_threads() -> int:
    """The threads the kernels now run on in this Python thread: what a kernel splits its work for.
    (numba.get_num_threads takes a lock each call: 2-3 us, and decoding asks over a hundred times a token.)"""
    return getattr(_in_force, "count", _limit)


SMALL_CLASS = 4  # batch classes up to 16 tokens: decoding and checking guesses


def _batch_class(n_tokens: int, variant: int) -> tuple[int, int]:
    """Batches of similar size (1, 2, 3-4, 5-8, ... tokens) and the same variant share measurements."""
    return min((n_tokens - 1).bit_length(), 10), variant


class ThreadGovernor:
    """Chooses the thread count of each forward from the measured cost per token at each count.

    fixed: always this many threads (tests and benchmarks that compare thread counts)."""

    PROBE_SHARE = 0.05  # at most this much of the time goes to trying counts that measured slower
    MAX_WAIT = 200  # forwards between tries at most, however slow a count once measured
    SMOOTHING = 0.3  # weight of the newest measurement in a count's moving average
    STALE = 4  # a count unused for more forwards than this is measured afresh, not averaged

    def __init__(self, fixed: int | None = None):
        self.fixed = fixed
        self.reset()

    def reset(self) -> None:
        """Forget what was measured (a warm-up's forwards include compiling)."""
        self._cost: dict[tuple, dict[int, float]] = {}  # batch class -> threads -> seconds per token
        self._idle: dict[tuple, dict[int, int]] = {}  # batch class -> threads -> forwards since it last ran

    @contextmanager
    def run(self, n_tokens: int, variant: int = 0):
        """Around one forward of n_tokens: sets its thread count and measures it. variant: forwards that cost
        differently for the same batch size (the model with layers skipped) are measured apart."""
        threads = self.choose(n_tokens, variant)
        _use(threads)  # in every thread that runs forwards: the setting is per thread
        started = time.perf_counter()
        yield threads
        self.record(n_tokens, threads, time.perf_counter() - started, variant)

    def choose(self, n_tokens: int, variant: int = 0) -> int:
        limit = self.fixed or thread_limit()
        if self.fixed or limit == 1:
            return limit
        group = _batch_class(n_tokens, variant)
        candidates = _candidates(limit)
        cost = self._cost.setdefault(group, {})
        if not cost:  # start where the nearest measured batch size is fastest
            reference = self._nearest(group, candidates)
            return min(candidates, key=reference.__getitem__) if reference else limit
        expected = {n: cost[n] if n in cost else self._estimate(group, n, cost) for n in candidates}
        best = min(candidates, key=expected.__getitem__)
        if best not in cost:  # expected to be faster and never tried here: try it
            return best
        idle = self._idle.setdefault(group, {})
        for n in candidates:  # a try of a slower count comes rarely enough to cost at most PROBE_SHARE
            waited = idle.get(n, 0)
            if n != best and (waited * expected[best] * self.PROBE_SHARE >= expected[n] or waited >= self.MAX_WAIT):
                return n
        return best

    def _nearest(self, group: tuple[int, int], counts: list[int]) -> dict[int, float] | None:
        """The measured costs of the batch class nearest in size that has measured all of these counts."""
        known = [g for g, cost in self._cost.items() if g != group and all(n in cost for n in counts)]
        return self._cost[min(known, key=lambda g: abs(g[0] - group[0]))] if known else None

    def _estimate(self, group: tuple[int, int], n: int, cost: dict[int, float]) -> float:
        """What n threads would cost in this batch class, from a count measured here and how the two compared
        in the nearest class that measured both. Without one, a small batch (decoding, guesses) tries n at
        once, and a large one (a long prompt, which threads suit) assumes they scale perfectly."""
        known = min(cost, key=cost.__getitem__)
        reference = self._nearest(group, [n, known])
        if reference:
            return cost[known] * reference[n] / reference[known]
        return 0.0 if group[0] <= SMALL_CLASS else cost[known] * known / n

    def record(self, n_tokens: int, threads: int, seconds: float, variant: int = 0) -> None:
        """What a forward of n_tokens at this many threads took."""
        if self.fixed or thread_limit() == 1:
            return
        group = _batch_class(n_tokens, variant)
        cost, idle = self._cost.setdefault(group, {}), self._idle.setdefault(group, {})
        per_token = seconds / n_tokens
        if threads in cost and idle.get(threads, 0) <= self.STALE:
            cost[threads] += self.SMOOTHING * (per_token - cost[threads])
        else:  # new, or tried again after a while: what it cost before says little about now
            cost[threads] = per_token
        for n in _candidates(thread_limit()):
            idle[n] = 0 if n == threads else idle.get(n, 0) + 1


def _candidates(limit: int) -> list[int]:
    """The limit, then halves down to 1: 8 -> [8, 4, 2, 1]."""
    counts = [limit]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts
