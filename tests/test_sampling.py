"""Samplers: exact distributions on small vectors, computed by hand, and clear errors for bad values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llamba.errors import LlambaError
from llamba.generation.sampling import Sampler

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))  # probabilities at temperature 1


def dist(**options):
    ids, probs = Sampler(**options).distribution(LOGITS)
    return dict(zip(ids.tolist(), np.round(probs.astype(np.float64), 6).tolist()))


def off(**options):
    """Every stage off except the ones named."""
    return {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "temperature": 1.0, **options}


def test_no_stage_keeps_the_softmax():
    assert dist(**off()) == {0: 0.5, 1: 0.2, 2: 0.15, 3: 0.1, 4: 0.05}


def test_greedy_at_temperature_zero():
    assert dist(temperature=0) == {0: 1.0}
    assert Sampler(temperature=0).sample(LOGITS) == 0


def test_top_k():
    assert dist(**off(top_k=2)) == {0: round(0.5 / 0.7, 6), 1: round(0.2 / 0.7, 6)}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cumulative 0.5, 0.7, 0.85: p = 0.8 needs the first three
    assert dist(**off(top_p=0.8)) == {0: round(0.5 / 0.85, 6), 1: round(0.2 / 0.85, 6), 2: round(0.15 / 0.85, 6)}


def test_min_p_relative_to_the_best():
    # keep p >= 0.3 * 0.5 = 0.15
    assert set(dist(**off(min_p=0.3))) == {0, 1, 2}


def test_temperature_sharpens():
    expected = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    expected /= expected.sum()
    assert dist(**off(temperature=0.5)) == dict(enumerate(np.round(expected, 6).tolist()))


def test_typical_p():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    entropy = -(p * np.log(p)).sum()  # 1.3354
    # |surprise - entropy|: 0.642, 0.274, 0.562, 0.967, 1.660 -> order 1, 2, 0, ...; mass 0.2+0.15 < 0.5 <= 0.85
    order = np.argsort(np.abs(-np.log(p) - entropy))
    assert order[:3].tolist() == [1, 2, 0]
    kept = dist(**off(typical_p=0.5))
    assert kept == {0: round(0.5 / 0.85, 6), 1: round(0.2 / 0.85, 6), 2: round(0.15 / 0.85, 6)}


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    s = Sampler(**off(repeat_penalty=2.0))
    ids, probs = s.distribution(logits, history=[0, 1])
    expected = np.exp([1.0, -2.0, 0.5])
    np.testing.assert_allclose(probs[np.argsort(ids)], expected / expected.sum(), rtol=1e-6)


def test_frequency_and_presence_penalties_and_window():
    logits = np.zeros(3, dtype=np.float32)
    s = Sampler(**off(frequency_penalty=0.5, presence_penalty=1.0, repeat_last_n=3))
    ids, probs = s.distribution(logits, history=[1, 0, 0, 0])  # the window sees 0, 0, 0
    expected = np.exp([-(3 * 0.5 + 1.0), 0.0, 0.0])
    np.testing.assert_allclose(probs[np.argsort(ids)], expected / expected.sum(), rtol=1e-6)


def test_logit_bias():
    assert Sampler(temperature=0, logit_bias={4: 100.0}).sample(LOGITS) == 4


def test_seeded_draws_repeat_and_follow_the_distribution():
    a = [Sampler(**off(seed=7)).sample(LOGITS) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(**off(seed=1))
    counts = np.bincount([s.sample(LOGITS) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.2, 0.15, 0.1, 0.05], atol=0.015)


@pytest.mark.parametrize("options", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -1}, {"top_k": -1},
    {"typical_p": 0}, {"repeat_penalty": 0}, {"temperature": math.nan},
])
def test_invalid_values_are_clear_errors(options):
    with pytest.raises(LlambaError):
        Sampler(**options)


def test_unknown_option():
    with pytest.raises(LlambaError, match="unknown sampling option 'topk'"):
        Sampler(topk=3)
