"""Mixtures of experts (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2) and latent attention: routing
against NumPy, batch invariance bit for bit, only the chosen experts read, and bad expert metadata or
checkpoints as clear errors.

(Their logits against a transformers-convention forward are in test_convert; against llama.cpp in
test_moe_llama_cpp.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from llamba.convert import convert
from llamba.errors import GGUFError, LlambaError, UnsupportedError
from llamba.memory.kv_cache import KVCache
from llamba.models import load_transformer
from llamba.models.ffn import ExpertFFN
from llamba.ops.routing import route_top_k, sigmoid
from tests import fuzz
from tests.hf_checkpoints import DEEPSEEK_YARN, MODELS, QWEN_YARN, hf_forward, write_checkpoint
from tests.test_batch import GUESSES, PROMPT, _check_invariance

# each family in a type of its own, so the experts run through several of the integer kernel's layouts
FAMILIES = {"qwen2moe": ("Qwen2MoeForCausalLM", "q8_0"), "qwen3moe": ("Qwen3MoeForCausalLM", "q4_0"),
            "mixtral": ("MixtralForCausalLM", "q5_1"), "olmoe": ("OlmoeForCausalLM", "q4_1"),
            "deepseek2": ("DeepseekV2ForCausalLM", "q8_0"), "deepseek3": ("DeepseekV3ForCausalLM", "q4_0")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe_path(request, tmp_path_factory) -> Path:
    model_class, output_type = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return convert(write_checkpoint(folder / "hf", model_class), folder / "model.gguf", output_type)


def _reference_route(scores: np.ndarray, k: int, normalize: bool):
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(probs, ids, axis=-1)
    return ids, weights / weights.sum(-1, keepdims=True) if normalize else weights


@pytest.mark.parametrize("normalize", [False, True])
def test_routing_matches_numpy(normalize):
    scores = np.random.default_rng(3).standard_normal((37, 60)).astype(np.float32) * 3
    ids, weights = route_top_k(scores, 8, normalize)
    want_ids, want_weights = _reference_route(scores.astype(np.float64), 8, normalize)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-6)
    x = np.linspace(-30, 30, 101, dtype=np.float32)
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x.astype(np.float64))), rtol=2e-6, atol=1e-30)


def _reference_grouped(scores, bias, k, n_group, group_used, sigmoid_gate, normalize):
    """Group-limited selection as llama.cpp does it, in NumPy: softmax or sigmoid, biased choice, the best
    groups by their two best, top k, (renormalized) unbiased weights."""
    if sigmoid_gate:
        probs = 1 / (1 + np.exp(-scores))
    else:
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    ids = []
    for choice in probs + bias:
        groups = choice.reshape(n_group, -1)
        kept = np.argsort(-np.sort(groups, axis=-1)[:, -2:].sum(-1), kind="stable")[:group_used]
        masked = np.full_like(groups, -np.inf)
        masked[kept] = groups[kept]
        ids.append(np.argsort(-masked.reshape(-1), kind="stable")[:k])
    ids = np.array(ids)
    weights = np.take_along_axis(probs, ids, axis=-1)
    return ids, weights / weights.sum(-1, keepdims=True) if normalize else weights


@pytest.mark.parametrize("sigmoid_gate, normalize", [(True, True), (False, False)])
def test_grouped_routing_matches_numpy(sigmoid_gate, normalize):
    """V3's noaux_tc (sigmoid, a selection bias, renormalized) and V2's group_limited_greedy (softmax, its
    weights as they are), each against NumPy."""
    rng = np.random.default_rng(5)
    scores = (rng.standard_normal((41, 64)) * 2).astype(np.float32)
    bias = (rng.standard_normal(64) * 0.3).astype(np.float32) if sigmoid_gate else np.zeros(64, np.float32)
    ids, weights = route_top_k(scores, 6, normalize, sigmoid_gate=sigmoid_gate, bias=bias, n_group=8, group_used=3)
    want_ids, want_weights = _reference_grouped(scores.astype(np.float64), bias, 6, 8, 3, sigmoid_gate, normalize)
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-6)
    ungrouped, _ = route_top_k(scores, 6, normalize, sigmoid_gate=sigmoid_gate, bias=bias)
    assert (ungrouped != ids).any(axis=1).mean() > 0.3  # the groups change many tokens' choice


def test_routing_of_a_token_does_not_depend_on_its_batch():
    scores = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    ids, weights = route_top_k(scores, 8, True)
    for t in (0, 31, 63):
        alone_ids, alone_weights = route_top_k(scores[t : t + 1], 8, True)
        assert np.array_equal(alone_ids[0], ids[t]) and np.array_equal(alone_weights[0], weights[t])


def _expert_layers(model) -> list:
    return [layer for layer in model.layers if isinstance(layer.ffn, ExpertFFN)]


def test_expert_logits_are_batch_invariant(moe_path):
    model = load_transformer(moe_path)
    assert len(_expert_layers(model)) == len(model.layers) - model.hp.n_dense_lead > 0
    _check_invariance(model, PROMPT, GUESSES)


def test_latent_attention_caches_the_latent_and_the_rotary_key(tmp_path):
    """DeepSeek-V2: kv_lora_rank + qk_rope_head_dim values per token and layer, one key head."""
    folder = write_checkpoint(tmp_path / "hf", "DeepseekV2ForCausalLM")
    model = load_transformer(convert(folder, tmp_path / "m.gguf", "f32"))
    assert (model.hp.n_head_kv, model.hp.head_dim) == (1, 64 + 16)
    assert model.layers[0].latent is not None and not isinstance(model.layers[0].ffn, ExpertFFN)  # a dense lead
    keys = KVCache.for_model(model.hp, 32).k[0]  # [n_head_kv, n_cells, values per token]
    assert (keys.shape[0], keys.shape[2]) == (1, 80)


@pytest.mark.parametrize("kv_type, value_bytes", [("f32", 4), ("f16", 2)])
def test_latent_cache_holds_each_vector_once(tmp_path, kv_type, value_bytes):
    """kv_lora_rank + n_rot values a token and layer, not twice that; the logits bit for bit those of a cache
    that keeps the values apart (a prompt, then decoding)."""
    model = load_transformer(convert(write_checkpoint(tmp_path / "hf", "DeepseekV2ForCausalLM"), tmp_path / "m.gguf",
                                     "q8_0"))
    hp = model.hp
    once = model.new_cache(64, kv_type)
    apart = KVCache(hp.n_layer, hp.n_head_kv, hp.head_dim, 64, kv_type)
    assert once.nbytes == hp.n_layer * once.n_cells * (64 + 16) * value_bytes == apart.nbytes // 2

    def run(cache) -> list[np.ndarray]:
        prompt = model.forward_tokens(PROMPT, 0, cache, all_logits=True)
        return [prompt] + [model.forward_tokens([t], len(PROMPT) + i, cache) for i, t in enumerate(GUESSES)]

    assert all(np.array_equal(a, b) for a, b in zip(run(once), run(apart)))
    assert once.nbytes_used == (len(PROMPT) + len(GUESSES)) * hp.n_layer * 80 * value_bytes


LONG_PROMPT = list(np.random.default_rng(8).integers(0, 380, 80))  # past SMALL_BATCH: the chain kernel's path


def _prompt_and_steps(model, cache) -> np.ndarray:
    prompt = model.forward_tokens(LONG_PROMPT, 0, cache, all_logits=True)
    steps = [model.forward_tokens([t], len(LONG_PROMPT) + i, cache) for i, t in enumerate(GUESSES)]
    return np.concatenate([prompt, np.stack(steps)])


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantized_latent_cache_holds_each_vector_once(tmp_path, kv_type):
    """A q8_0 / q4_0 latent cache: one row of blocks a token and layer. Plain blocks give the bits of a cache
    keeping the values apart; centred and spread (after calibration) the values come back through the spread
    and centre after attention, as close to the float cache's logits as keeping them apart is."""
    from llamba.ops.kv_blocks import row_bytes

    folder = write_checkpoint(tmp_path / "hf", "DeepseekV2ForCausalLM", kv_lora_rank=48)  # 48 + 16: two blocks
    model = load_transformer(convert(folder, tmp_path / "m.gguf", "f32"))
    hp = model.hp
    apart = lambda stats: KVCache(hp.n_layer, 1, hp.head_dim, 128, kv_type, key_stats=stats)  # noqa: E731
    once = model.new_cache(128, kv_type)
    assert once.nbytes == hp.n_layer * once.n_cells * row_bytes(kv_type, 64) == apart(None).nbytes // 2
    assert np.array_equal(_prompt_and_steps(model, once), _prompt_and_steps(model, apart(None)))
    stats = model.calibrate_keys(LONG_PROMPT)
    exact = _prompt_and_steps(model, model.new_cache(128, "f32"))
    shared = _prompt_and_steps(model, model.new_cache(128, kv_type))
    separate = _prompt_and_steps(model, apart(stats))
    assert 0 < np.abs(shared - exact).max() <= 2 * np.abs(separate - exact).max()
    _check_invariance(model, PROMPT, GUESSES, kv_type)


def test_fused_phi3_logits_are_batch_invariant(tmp_path):
    model = load_transformer(convert(write_checkpoint(tmp_path / "hf", "Phi3ForCausalLM"), tmp_path / "m.gguf", "q8_0"))
    assert len(model.layers[0].wqkv) == 1 and len(model.layers[0].ffn.gate_up) == 1
    _check_invariance(model, PROMPT, GUESSES)


def test_a_token_reads_only_its_experts(moe_path):
    """Decoding one token calls the chosen experts and no other: the rest are replaced by experts that fail."""
    model = load_transformer(moe_path)
    cache = KVCache.for_model(model.hp, 64)
    model.forward_tokens(PROMPT, 0, cache)
    chosen = _record_routes(model)
    expected = model.forward_tokens([GUESSES[0]], len(PROMPT), cache)
    for layer, used in zip(_expert_layers(model), chosen):
        assert len(used) == model.hp.n_expert_used < model.hp.n_expert
        layer.ffn.experts = [e if i in used else _Untouchable() for i, e in enumerate(layer.ffn.experts)]
    cache.remove(0, len(PROMPT))
    assert np.array_equal(model.forward_tokens([GUESSES[0]], len(PROMPT), cache), expected)


class _Untouchable:
    def __call__(self, h):
        raise AssertionError("an expert the token was not routed to was run")


def _record_routes(model) -> list[set[int]]:
    """The experts each layer's next call routes to (recorded by wrapping the experts)."""
    chosen = []
    for layer in _expert_layers(model):
        used: set[int] = set()
        layer.ffn.experts = [_Recording(e, i, used) for i, e in enumerate(layer.ffn.experts)]
        chosen.append(used)
    return chosen


class _Recording:
    def __init__(self, expert, index: int, used: set[int]):
        self.expert, self.index, self.used = expert, index, used

    def __call__(self, h):
        self.used.add(self.index)
        return self.expert(h)


def test_a_batch_runs_each_expert_once_over_its_tokens(moe_path):
    """Prefill groups tokens by expert: one product per expert, over every token routed to it."""
    model = load_transformer(moe_path)
    calls = []
    for layer in _expert_layers(model)[:1]:
        layer.ffn.experts = [_Counting(e, i, calls) for i, e in enumerate(layer.ffn.experts)]
    model.forward_tokens(PROMPT, 0, KVCache.for_model(model.hp, 64))
    experts = [i for i, _ in calls]
    assert len(experts) == len(set(experts)) > model.hp.n_expert_used  # each once, and several used
    assert sum(n for _, n in calls) == len(PROMPT) * model.hp.n_expert_used


class _Counting:
    def __init__(self, expert, index: int, calls: list):
        self.expert, self.index, self.calls = expert, index, calls

    def __call__(self, h):
        self.calls.append((self.index, h.shape[0]))
        return self.expert(h)


# ----------------------------------------------------------------------------------------------- bad input

def _mutant(path: Path, out: Path, edit) -> Path:
    spec = fuzz.spec_of(path, keep_data=True)
    edit(spec)
    spec.write(out)
    return out


def _set(key, value):
    return lambda spec: spec.kv.__setitem__(key, (value, fuzz.VT.UINT32, None))


def _reshape(name, shape):
    def edit(spec):
        (t,) = [t for t in spec.tensors if t.name == name]
        t.shape = shape
    return edit


@pytest.fixture(scope="module")
def qwen3moe_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3moe")
    return convert(write_checkpoint(folder / "hf", "Qwen3MoeForCausalLM"), folder / "model.gguf", "f32")


@pytest.mark.parametrize("edit, fragment", [
    (_set("qwen3moe.expert_used_count", 9), "qwen3moe.expert_used_count = 9 is out of range (expected 1 to 8)"),
    (_set("qwen3moe.expert_used_count", 0), "qwen3moe.expert_used_count = 0 is out of range"),
    (_set("qwen3moe.expert_count", 4), "blk.0.ffn_gate_exps.weight has shape (64, 64, 8), expected (64, 64, 4)"),
    (_set("qwen3moe.expert_count", 100000), "qwen3moe.expert_count = 100000 is out of range"),
    (_set("qwen3moe.expert_feed_forward_length", 32), "blk.0.ffn_gate_exps.weight has shape (64, 64, 8), expected"),
    (_reshape("blk.1.ffn_down_exps.weight", (64, 64, 4)), "blk.1.ffn_down_exps.weight has shape (64, 64, 4)"),
    (lambda spec: spec.kv.pop("qwen3moe.expert_used_count"), "qwen3moe.expert_used_count is missing"),
])
def test_inconsistent_expert_metadata_is_a_clear_error(qwen3moe_path, tmp_path, edit, fragment):
    path = _mutant(qwen3moe_path, tmp_path / "bad.gguf", edit)
    with pytest.raises(GGUFError) as e:
        load_transformer(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, kind, fragment", [
    ("rope.scaling.yarn_log_multiplier", -0.5, fuzz.VT.FLOAT32, "yarn_log_multiplier = -0.5 must be finite and at"),
    ("rope.scaling.yarn_log_multiplier", "x", fuzz.VT.STRING, "yarn_log_multiplier = 'x' is not a number"),
    ("rope.scaling.type", "linear", fuzz.VT.STRING, "DeepSeek2 with RoPE scaling 'linear' is not supported"),
])
def test_bad_deepseek_yarn_metadata_is_a_clear_error(tmp_path, key, value, kind, fragment):
    folder = write_checkpoint(tmp_path / "hf", "DeepseekV2ForCausalLM", **DEEPSEEK_YARN)
    edit = lambda spec: spec.kv.__setitem__(f"deepseek2.{key}", (value, kind, None))  # noqa: E731
    path = _mutant(convert(folder, tmp_path / "m.gguf", "f32"), tmp_path / "bad.gguf", edit)
    with pytest.raises(LlambaError) as e:
        load_transformer(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_unsupported_architecture_names_the_supported_ones(qwen3moe_path, tmp_path):
    path = _mutant(qwen3moe_path, tmp_path / "bad.gguf",
                   lambda spec: spec.kv.__setitem__("general.architecture", ("grok", fuzz.VT.STRING, None)))
    supported = r"architecture 'grok' is not supported \(supported: .*deepseek2.*olmoe.*phi3.*qwen2moe.*qwen3moe"
    with pytest.raises(UnsupportedError, match=supported):
        load_transformer(path)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("model_class, changes, fragment", [
    ("Qwen3MoeForCausalLM", {"num_experts": 6}, "do not match the config's 6"),
    ("Qwen3MoeForCausalLM", {"norm_topk_prob": False}, "norm_topk_prob = false is not supported"),
    ("Qwen2MoeForCausalLM", {"norm_topk_prob": True}, "norm_topk_prob = true is not supported"),
    ("Qwen2MoeForCausalLM", {"mlp_only_layers": [1]}, "dense layers between the expert layers"),
    ("MixtralForCausalLM", {"num_local_experts": None}, "'num_local_experts' is missing"),
    ("DeepseekV2ForCausalLM", {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "DeepSeek with rope_scaling = 'dynamic' is not supported"),
    ("DeepseekV2ForCausalLM", {"topk_method": "random"}, "DeepSeek with topk_method = 'random' is not supported"),
])
def test_inconsistent_checkpoints_are_clear_errors(tmp_path, model_class, changes, fragment):
    folder = write_checkpoint(tmp_path / "hf", model_class)
    _edit_config(folder, **changes)
    with pytest.raises(LlambaError, match=None) as e:
        convert(folder, tmp_path / "model.gguf", "f32")
    assert fragment in str(e.value)
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize("model_class",
                         ["Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "Phi3ForCausalLM"])
def test_export_gives_back_the_checkpoint(tmp_path, model_class):
    """convert at F32, export, convert again: the original tensors, and the same file's logits bit for bit."""
    from llamba.convert import export
    from tests.test_convert import _checkpoint_tensors

    folder = write_checkpoint(tmp_path / "hf", model_class)
    first = convert(folder, tmp_path / "first.gguf", "f32")
    exported = export(first, tmp_path / "exported")
    original, _ = _checkpoint_tensors(folder)
    back, config = _checkpoint_tensors(exported)
    assert json.loads((exported / "config.json").read_text())["architectures"] == [model_class]
    assert sorted(back) == sorted(original)
    assert all(np.array_equal(back[name], original[name]) for name in original)
    again = load_transformer(convert(exported, tmp_path / "again.gguf", "f32"))
    cache = lambda model: KVCache.for_model(model.hp, 64)  # noqa: E731
    model = load_transformer(first)
    assert np.array_equal(again.forward_tokens(PROMPT, 0, cache(again), all_logits=True),
                          model.forward_tokens(PROMPT, 0, cache(model), all_logits=True))


def test_info_counts_the_active_parameters(qwen3moe_path):
    from llamba.formats.describe import describe
    from llamba.formats.gguf import open_gguf

    summary = describe(open_gguf(qwen3moe_path))
    idle = 2 * 3 * (8 - 2) * 64 * 64  # layers x (gate, up, down) x experts not used x [n_ff_exp, n_embd]
    assert (summary["expert_count"], summary["expert_used_count"]) == (8, 2)
    assert summary["active_parameters"] == summary["parameters"] - idle


# ------------------------------------------------------------------------------------------ YaRN

@pytest.mark.parametrize("n_rot, base, scaling", [
    (64, 10000.0, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                   "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),  # DeepSeek-V2's
    (128, 1e6, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),  # Qwen2.5's
])
def test_yarn_tables_match_transformers(n_rot, base, scaling):
    """The released checkpoints' YaRN at their head sizes, far into the stretched context, against
    transformers' frequencies and cos/sin factor (tests/hf_checkpoints); DeepSeek's attention scale too."""
    from llamba.ops.rope import RopeConfig, rope_tables, yarn_attention_scale
    from tests.hf_checkpoints import _softmax_scale, _yarn_inv_freq

    cfg = RopeConfig(n_rot=n_rot, base=base, scaling="yarn", factor=float(scaling["factor"]),
                     n_ctx_orig=scaling["original_max_position_embeddings"],
                     yarn_mscale_all_dim=scaling.get("mscale_all_dim", 0.0))
    positions = np.array([0, 1, 7, 300, 4095, 4096, 50_000, 131_000])
    cos, sin = rope_tables(positions, cfg)
    inv, magnitude = _yarn_inv_freq(base ** (-np.arange(0, n_rot, 2) / n_rot), scaling, n_rot, base)
    angles = positions[:, None] * inv[None, :]
    np.testing.assert_allclose(cos, np.cos(angles) * magnitude, atol=2e-6)
    np.testing.assert_allclose(sin, np.sin(angles) * magnitude, atol=2e-6)
    head = 192  # DeepSeek-V2's nope + rope head size
    assert yarn_attention_scale(cfg) / math.sqrt(head) == pytest.approx(_softmax_scale({"rope_scaling": scaling}, head))


@pytest.mark.parametrize("model_class, changes", [("DeepseekV2ForCausalLM", DEEPSEEK_YARN),
                                                  ("Qwen2ForCausalLM", QWEN_YARN),
                                                  ("LlamaForCausalLM", {"rope_scaling": QWEN_YARN["rope_scaling"]})])
def test_yarn_checkpoints_match_their_forward(tmp_path, model_class, changes):
    """A checkpoint with YaRN rope_scaling converts with llama.cpp's keys and runs as transformers runs it;
    the positions are far enough for YaRN to matter (the forward without it is far off)."""
    from llamba.formats.gguf import open_gguf
    from tests.test_convert import _checkpoint_tensors

    folder = write_checkpoint(tmp_path / "hf", model_class, seed=4, **changes)
    path = convert(folder, tmp_path / "model.gguf", "f32")
    g = open_gguf(path)
    arch, scaling = g.architecture, changes["rope_scaling"]
    assert (g.get(f"{arch}.rope.scaling.type"), g.get(f"{arch}.rope.scaling.factor")) == ("yarn", scaling["factor"])
    assert g.get(f"{arch}.rope.scaling.original_context_length") == scaling["original_max_position_embeddings"]
    if "mscale_all_dim" in scaling:
        assert g.get(f"{arch}.rope.scaling.yarn_log_multiplier") == pytest.approx(0.0707)
    ids = list(np.random.default_rng(4).integers(0, 300, 64))
    tensors, config = _checkpoint_tensors(folder)
    family = MODELS[model_class][0]
    expected = hf_forward(tensors, config, family, ids)
    without = hf_forward(tensors, {k: v for k, v in config.items() if k != "rope_scaling"}, family, ids)
    model = load_transformer(path)
    ours = model.forward_tokens(ids, 0, KVCache.for_model(model.hp, 64, kv_type="f32"), all_logits=True)
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(ours - without).max() > 0.05 * np.abs(expected).max()
