"""Decoders that guess ahead: at temperature 0 their output is token for token plain greedy decoding; above
it, speculative sampling leaves the output distribution exactly the target's."""

from __future__ import annotations

import numpy as np
import pytest

from llamba.models import load_transformer
from llamba.generation.decoding import Controller, Speculation, make_speculation
from llamba.generation.decoding import draft_model
from llamba.generation.decoding.auto import DRAFT, AutoDrafter
from llamba.generation.decoding.draft_model import DraftModel
from llamba.generation.decoding.lookahead import Lookahead
from llamba.generation.decoding.prompt_lookup import PromptLookup
from llamba.generation.decoding.self_speculation import SelfSpeculation, choose_skipped_layers
from llamba.generation.decoding.speculative import (STEADY_LAG, Draft, _accept, decode_tokens, guess,
                                                    verify_guesses)
from llamba.memory.kv_cache import KVCache
from llamba.generation.sampling import Sampler
from tests.tiny_models import write_tiny_model

REPEATING = [5, 17, 299, 42, 7, 123, 5, 17, 299, 42, 7, 123, 5, 17]  # prompt lookup has something to copy


def _generate(model, prompt, n, speculation=None, sampler=None):
    cache = KVCache.for_model(model.hp, 128)
    logits = model.forward_tokens(prompt, 0, cache)
    history = list(prompt)
    sampler = sampler or Sampler(temperature=0)
    return list(decode_tokens(model, cache, logits, len(prompt), history, sampler, speculation, n))


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3"])
def tiny_pair(request, tmp_path_factory):
    """A tiny model and a smaller draft of the same vocabulary (other weights: it guesses wrong often)."""
    d = tmp_path_factory.mktemp(request.param)
    n_layer = 6 if request.param == "gemma3" else 2
    target = load_transformer(write_tiny_model(d / "t.gguf", request.param, n_layer=n_layer))
    draft = load_transformer(write_tiny_model(d / "d.gguf", request.param, n_layer=1, seed=7))
    return target, draft


def test_decoders_equal_greedy_on_tiny_models(tiny_pair):
    target, draft = tiny_pair
    plain = _generate(target, REPEATING, 40)
    lookup = Speculation(PromptLookup(), Controller(fixed_k=4))
    assert _generate(target, REPEATING, 40, lookup) == plain
    assert lookup.stats.proposed > 0
    drafted = Speculation(DraftModel(draft, 128, target.hp.n_vocab), Controller(fixed_k=3))
    assert _generate(target, REPEATING, 40, drafted) == plain
    itself = Speculation(DraftModel(target, 128, target.hp.n_vocab), Controller(fixed_k=5))
    assert _generate(target, REPEATING, 40, itself) == plain  # a perfect draft: every guess accepted
    assert itself.stats.accepted == itself.stats.proposed > 0
    lookahead = Speculation(Lookahead(window=3, ngram=3, candidates=2), Controller(fixed_k=4))
    assert _generate(target, REPEATING, 40, lookahead) == plain
    assert lookahead.stats.proposed > 0
    self_spec = Speculation(SelfSpeculation(target, 128), Controller(fixed_k=3))
    assert _generate(target, REPEATING, 40, self_spec) == plain
    assert self_spec.stats.proposed > 0


@pytest.mark.slow
def test_decoders_equal_greedy_on_real_models(model_path):
    from llamba import Llama

    llm = Llama(model_path, n_ctx=512, n_threads=2)
    prompt = ("Rewrite this with a docstring:\ndef area(width, height):\n    return width * height\n\n"
              "def area(width, height):\n")
    plain = llm.generate(prompt, max_tokens=48, temperature=0)
    for decoding in ("prompt-lookup", "lookahead", "self-spec", "auto"):
        assert llm.generate(prompt, max_tokens=48, temperature=0, decoding=decoding) == plain, decoding
    assert llm.last_stats.speculation is not None


def _chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """P(chi-square >= observed) by the Wilson-Hilferty normal approximation (no SciPy needed)."""
    from math import erf, sqrt

    stat = float(((counts - expected) ** 2 / expected).sum())
    k = len(counts) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / sqrt(2 / (9 * k))
    return 0.5 * (1 - erf(z / sqrt(2)))


def test_accept_rule_reproduces_the_target():
    rng = np.random.default_rng(5)
    ids = np.array([3, 8, 1, 9, 4])
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    q_ids, q_p = np.array([8, 3, 7, 9]), np.array([0.5, 0.2, 0.2, 0.1])
    n = 20000
    counts = {int(t): 0 for t in ids}
    for _ in range(n):
        guess = int(rng.choice(q_ids, p=q_p))
        ok, token = _accept(ids, p, guess, (q_ids, q_p), rng)
        counts[guess if ok else token] += 1
    observed = np.array([counts[int(t)] for t in ids], float)
    assert _chi2_pvalue(observed, p * n) > 0.01


def test_auto_copies_where_the_context_matches_and_asks_the_draft_elsewhere(tiny_pair, monkeypatch):
    """auto with a draft model: the output is still plain greedy's; both kinds of guess were checked (copies
    after a match of two tokens or more, the draft's where the context offered none)."""
    monkeypatch.setattr(draft_model, "MIN_CONFIDENCE", 0.0)  # a random tiny model is rarely sure of anything
    target, draft = tiny_pair
    prompt = REPEATING[:7] + [250, 251, 252, 253]  # the end matches nothing earlier: the draft is asked first
    plain = _generate(target, prompt, 40)
    auto = Speculation(AutoDrafter(PromptLookup(), DraftModel(draft, 128, target.hp.n_vocab)), Controller(fixed_k=3))
    assert _generate(target, prompt, 40, auto) == plain
    kinds = set(auto.controller.accept_rates)
    assert DRAFT in kinds and any(k != DRAFT and k >= 2 for k in kinds), kinds


def test_a_drafts_catch_up_is_not_charged_to_its_guesses(tiny_pair, monkeypatch):
    """Under auto, a draft model first asked after a run of copies must read those tokens first: a one-off
    catch-up, which charged to its guesses made them look too dear to try again (on the 1.5B with the 0.5B
    the draft was then never used). Only steps where it reads at most STEADY_LAG tokens set its cost."""
    monkeypatch.setattr(draft_model, "MIN_CONFIDENCE", 0.0)
    target, draft = tiny_pair
    drafter = DraftModel(draft, 128, target.hp.n_vocab)
    auto = Speculation(AutoDrafter(PromptLookup(), drafter), Controller(fixed_k=3))
    auto.fresh = False  # a generation underway: its tokens so far were copied, the draft has read none
    history = list(range(40, 80))  # nothing repeats: the draft is the only kind on offer
    first = guess(auto, history, 8, Sampler(temperature=0))
    assert first.kind == DRAFT and len(first.tokens) == 3 and drafter.lag(history) == 0
    assert DRAFT not in auto.controller.draft_costs  # 39 tokens read: not what a guess costs
    history += first.tokens[:1] + [7]  # the target took one guess and gave its own next token
    assert drafter.lag(history) <= STEADY_LAG
    guess(auto, history, 8, Sampler(temperature=0))
    assert auto.controller.draft_costs[DRAFT] > 0


def test_a_draft_head_of_the_first_tokens_guesses_only_those(tiny_pair, monkeypatch):
    """With the draft's logits cut to its first rows (one chunk of 32 here), it guesses none past them, and
    the output is still plain greedy's."""
    monkeypatch.setattr(draft_model, "DRAFT_VOCAB", 20)
    monkeypatch.setattr(draft_model, "MIN_CONFIDENCE", 0.0)
    target, draft = tiny_pair
    plain = _generate(target, REPEATING, 30)
    drafter = DraftModel(draft, 128, target.hp.n_vocab)
    guesses = drafter.propose(REPEATING, 4, Sampler(temperature=0)).tokens
    assert len(guesses) == 4 and max(guesses) < 32 and np.isneginf(drafter.logits[32:]).all()
    drafter.reset()
    assert _generate(target, REPEATING, 30, Speculation(drafter, Controller(fixed_k=3))) == plain


def test_sampling_with_guesses_matches_plain_sampling(tiny_pair):
    """End to end on a tiny model at temperature 1: the second token's distribution with a draft model's
    guesses equals the one without (chi-square over many seeded runs)."""
    target, draft = tiny_pair
    prompt = REPEATING[:6]
    params = dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0)
    cache = KVCache.for_model(target.hp, 32)
    first = _generate(target, prompt, 1, sampler=Sampler(**params, seed=0))[0]
    logits = target.forward_tokens(prompt + [first], 0, cache)
    ids, p = Sampler(**params).distribution(logits, prompt + [first])
    spec = Speculation(DraftModel(draft, 32, target.hp.n_vocab), Controller(fixed_k=2))
    seen: dict[int, int] = {}
    runs = proposed = 0
    for seed in range(1500):
        out = _generate(target, prompt, 3, spec, Sampler(**params, seed=seed))  # 3: a guess is verified
        proposed += spec.stats.proposed
        if out[0] == first:
            seen[out[1]] = seen.get(out[1], 0) + 1
            runs += 1
    observed = np.array([seen.get(int(t), 0) for t in ids], float)
    assert observed.sum() == runs > 200 and proposed >= 1500
    assert _chi2_pvalue(observed, p * runs) > 0.01


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_transformer(write_tiny_model(tmp_path_factory.mktemp("llama") / "t.gguf", "llama", n_layer=4))


@pytest.mark.parametrize("decoder", ["prompt-lookup", "lookahead", "self-spec"])
def test_each_decoder_samples_like_plain_sampling(tiny_llama, decoder):
    """At temperature 1 the token after a forced one has the target's distribution whichever decoder guessed
    (chi-square over many seeded runs). The forced token occurred in the prompt, so every decoder guesses."""
    target = tiny_llama
    prompt, forced = REPEATING[:8], REPEATING[2]
    params = dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0)
    cache = KVCache.for_model(target.hp, 32)
    ids, p = Sampler(**params).distribution(target.forward_tokens(prompt + [forced], 0, cache), prompt + [forced])
    cache.remove(0, len(prompt))
    first = np.full(target.hp.n_vocab, -1e9, np.float32)
    first[forced] = 0.0
    drafter = {"prompt-lookup": lambda: PromptLookup(), "lookahead": lambda: Lookahead(window=2, ngram=3),
               "self-spec": lambda: SelfSpeculation(target, 32)}[decoder]()
    spec = Speculation(drafter, Controller(fixed_k=3))
    counts = dict.fromkeys(ids.tolist(), 0)
    runs = 1200
    for seed in range(runs):
        out = list(decode_tokens(target, cache, first, len(prompt), list(prompt), Sampler(**params, seed=seed),
                                 spec, 3))  # 3: the second token is chosen by verifying a guess
        cache.remove(0, len(prompt))
        assert out[0] == forced and spec.stats.proposed >= 1
        counts[out[1]] += 1
    assert _chi2_pvalue(np.array(list(counts.values()), float), p * runs) > 0.01


def test_tree_verification_keeps_the_target_distribution():
    """Two candidate lines share the root: the first token follows the root row's distribution exactly, and
    a matching child is followed into its own row."""
    n_vocab = 6
    root = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.06, 0.04]))
    child_rows = {1: np.log(np.array([0.05, 0.05, 0.7, 0.1, 0.05, 0.05])),
                  3: np.log(np.array([0.1, 0.1, 0.1, 0.1, 0.1, 0.5]))}
    draft = Draft([1, 3, 2], parents=[-1, -1, 0])  # 1 -> 2, and 3
    rows = np.stack([root, child_rows[1], child_rows[3], np.zeros(n_vocab)]).astype(np.float32)
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    firsts = np.zeros(n_vocab)
    after_1 = np.zeros(n_vocab)
    for _ in range(20000):
        verdict = verify_guesses(rows, draft, sampler, [0])
        tokens = verdict.accepted + [verdict.following]
        firsts[tokens[0]] += 1
        if tokens[0] == 1:
            after_1[tokens[1]] += 1
            assert verdict.kept[:2] == [0, 1]
    assert _chi2_pvalue(firsts, np.exp(root) * firsts.sum()) > 0.01
    assert _chi2_pvalue(after_1, np.exp(child_rows[1]) * after_1.sum()) > 0.01


def test_lookahead_lays_out_its_window_as_columns():
    drafter = Lookahead(window=3, ngram=3, candidates=2)
    context = [4, 9, 4, 9, 7, 4]
    draft = drafter.propose(context, 4, None)
    # prompt lookup copies what followed the last 4 (9, 7, 4); the pool adds 4 -> (9, 7), (9, 4): one tree
    assert draft.tokens[: draft.n_guesses] == [9, 7, 4, 4] and draft.parents[: draft.n_guesses] == [-1, 0, 1, 0]
    batch = draft.batch(context[-1], 10)
    batch.validate(n_vocab=16)
    window = batch.positions[1 + draft.n_guesses :].reshape(2, 3)  # level by column
    assert (window == 11 + np.arange(3)[None, :] + np.arange(2)[:, None]).all()


def test_self_speculation_measures_its_skipped_layers(tiny_llama):
    skip = choose_skipped_layers(tiny_llama, REPEATING * 3)
    assert 1 <= len(skip) < tiny_llama.hp.n_layer and skip <= set(range(tiny_llama.hp.n_layer))


def test_prompt_lookup_copies_what_followed():
    drafter = PromptLookup()
    assert drafter.propose([1, 2, 3, 4, 5, 9, 2, 3], 3).tokens == [4, 5, 9]
    assert drafter.propose([1, 2, 3], 3).tokens == []
    assert drafter.kind([1, 2, 3, 4, 5, 9, 2, 3]) == 2  # "2 3" matched
    assert drafter.kind([1, 2, 3, 4, 5, 9, 3]) == 1 and drafter.kind([1, 2, 3]) is None


def test_controller_learns_a_rate_per_kind_of_guess():
    """Guesses after long matches held, after short ones failed: it keeps guessing on the first kind only."""
    controller = Controller(max_k=8)
    for n in (1, 2, 5, 9):
        controller.record_forward(n, 0.010 + 0.001 * (n - 1))
    for _ in range(30):
        controller.record_guesses(proposed=4, accepted=4, kind=3)
        controller.record_guesses(proposed=4, accepted=0, kind=1)
    assert controller.choose(8, kind=3) >= 4
    assert controller.choose(8, kind=1) == 0
    assert controller.choose(8, kind="new") > 0  # a kind not yet seen starts hopeful


def test_unknown_decoder_is_a_clear_error():
    from llamba.errors import LlambaError

    with pytest.raises(LlambaError, match="unknown decoding"):
        make_speculation("telepathy")
