"""The thread governor: on simulated machines, it finds the fastest thread count, spends little on trying the
others, and follows the machine when background load comes and goes."""

from __future__ import annotations

import pytest

from llamba.ops import threads as threads_module
from llamba.ops.threads import ThreadGovernor


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(threads_module, "_limit", 4)


def _run(governor, seconds_at, n_forwards, n_tokens=1):
    """Simulated forwards: seconds_at[threads] is what one costs. Returns the total time and the counts used."""
    total, used = 0.0, []
    for _ in range(n_forwards):
        threads = governor.choose(n_tokens)
        total += seconds_at[threads] * n_tokens
        governor.record(n_tokens, threads, seconds_at[threads] * n_tokens)
        used.append(threads)
    return total, used


QUIET = {4: 0.004, 2: 0.006, 1: 0.010}
BUSY = {4: 0.150, 2: 0.020, 1: 0.012}  # other processes hold the cores: the barriers wait out time slices


def test_it_settles_on_the_fastest_count_and_tries_the_others_sparingly(four_cores):
    governor = ThreadGovernor()
    total, used = _run(governor, QUIET, 1000)
    assert used[0] == 4  # the limit first
    assert used[-100:].count(4) >= 90
    assert total <= 1.06 * 1000 * QUIET[4]


def test_it_follows_background_load_as_it_comes_and_goes(four_cores):
    governor = ThreadGovernor()
    _run(governor, QUIET, 100)
    loaded, used = _run(governor, BUSY, 1000)
    assert used[-100:].count(1) >= 90
    assert loaded <= 1.10 * 1000 * BUSY[1]  # the switch is quick and the tries of 4 threads are rare
    quiet_again, used = _run(governor, QUIET, 400)
    assert used[-100:].count(4) >= 90  # the cores came back, and so did the threads


def test_batch_sizes_are_measured_apart(four_cores):
    governor = ThreadGovernor()
    _run(governor, BUSY, 50, n_tokens=1)
    _, used = _run(governor, {4: 0.001, 2: 0.002, 1: 0.004}, 400, n_tokens=128)  # prompts: threads pay
    assert used[-20:].count(4) >= 18
    assert governor.choose(1) == 1


def test_fixed_and_single_thread(four_cores, monkeypatch):
    assert ThreadGovernor(fixed=2).choose(1) == 2
    monkeypatch.setattr(threads_module, "_limit", 1)
    assert ThreadGovernor().choose(1) == 1


def test_a_long_prompt_starts_from_what_smaller_batches_measured(four_cores):
    governor = ThreadGovernor()
    _run(governor, QUIET, 20)  # decoding: 4 threads are fastest
    _, used = _run(governor, QUIET, 10, n_tokens=200)
    assert used == [4] * 10  # no prompt is spent trying fewer threads that decoding measured slower
    loaded = ThreadGovernor()
    _run(loaded, BUSY, 20)
    _, used = _run(loaded, BUSY, 10, n_tokens=200)
    assert used[0] == 1 and used[-5:] == [1] * 5  # under load the first prompt already takes one thread
