"""Tiny random Hugging Face checkpoints (config.json, safetensors, a trained tokenizer) and a NumPy forward
that follows Hugging Face's own conventions: halves-rotating RoPE on unpermuted Q/K, Gemma's (1 + w) norms and
scaled embeddings. It shares nothing with the converter, so it checks the converter's renaming, permutation
and norm shift from the outside."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CORPUS = [
    "The quick brown fox jumps over the lazy dog 1234 times.",
    "Hello world! def main(): return 42  # answer",
    "Über naïve café, 東京 and Москва; tabs\tand  spaces.",
    "She sells sea shells by the sea shore, 3.14159 and 2718.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

DEEPSEEK_V2 = {"tie_word_embeddings": False, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": 64,
               "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 8,
               "num_experts_per_tok": 2, "n_shared_experts": 2, "moe_intermediate_size": 32,
               "first_k_dense_replace": 1, "routed_scaling_factor": 1.5, "norm_topk_prob": False,
               "topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
               "moe_layer_freq": 1, "intermediate_size": 96}
# YaRN as the released checkpoints set it (DeepSeek-V2: 40 times 4096 positions, mscale = mscale_all_dim = 0.707;
# Qwen2.5: 4 times 32768), over a shorter original context so that the tiny heads' pairs span the whole ramp
# (extrapolated, blended, interpolated) within the tests' 64 positions
DEEPSEEK_YARN = {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 256,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                 "max_position_embeddings": 10240}
QWEN_YARN = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             "tie_word_embeddings": False}
# class name -> (family, config beyond the common one)
MODELS = {
    "LlamaForCausalLM": ("llama", {"tie_word_embeddings": False}),
    "MistralForCausalLM": ("llama", {"tie_word_embeddings": True}),
    "Qwen2ForCausalLM": ("qwen2", {"tie_word_embeddings": True}),
    "Qwen3ForCausalLM": ("qwen3", {"tie_word_embeddings": True, "head_dim": 32}),
    "Qwen2MoeForCausalLM": ("qwen2moe", {"tie_word_embeddings": False, "num_experts": 8, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96,
                                         "norm_topk_prob": False}),
    "Qwen3MoeForCausalLM": ("qwen3moe", {"tie_word_embeddings": False, "head_dim": 32, "num_experts": 8,
                                         "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                         "norm_topk_prob": True}),
    "MixtralForCausalLM": ("mixtral", {"tie_word_embeddings": False, "num_local_experts": 4,
                                       "num_experts_per_tok": 2, "intermediate_size": 96, "rope_theta": 1e6}),
    "OlmoeForCausalLM": ("olmoe", {"tie_word_embeddings": False, "num_key_value_heads": 4, "num_experts": 8,
                                   "num_experts_per_tok": 2, "intermediate_size": 64, "norm_topk_prob": False}),
    "Phi3ForCausalLM": ("phi3", {"tie_word_embeddings": False}),
    "DeepseekV2ForCausalLM": ("deepseek2", DEEPSEEK_V2),
    "DeepseekV3ForCausalLM": ("deepseek2", {**DEEPSEEK_V2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                                            "norm_topk_prob": True, "topk_method": "noaux_tc",
                                            "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2}),
    "Gemma3ForCausalLM": ("gemma3", {"tie_word_embeddings": True, "head_dim": 32, "num_key_value_heads": 1,
                                     "num_hidden_layers": 7, "sliding_window": 4, "query_pre_attn_scalar": 32,
                                     "rope_theta": 1e6, "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6}),
}


def write_bpe_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained by the tokenizers package, with SmolLM's pre-tokenizer; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>",
                                                   "add_bos_token": False, "chat_template": TEMPLATE})
    return tok.get_vocab_size()


def write_spm_tokenizer(folder: Path) -> int:
    """A SentencePiece BPE model with byte fallback, trained by the sentencepiece package."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(folder / "tokenizer_config.json", {"add_bos_token": True, "chat_template": TEMPLATE})
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def write_checkpoint(folder: Path, model_class: str, tokenizer: str = "bpe", seed: int = 0,
                     dtype=np.float32, wrapped: bool = False, **settings) -> Path:
    """A random checkpoint of `model_class`; `wrapped` writes Gemma 3 as Gemma3ForConditionalGeneration
    (text config nested, names under language_model., a vision tensor to be left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_tokens = (write_bpe_tokenizer if tokenizer == "bpe" else write_spm_tokenizer)(folder)
    family, extra = MODELS[model_class]
    config = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "vocab_size": n_tokens + 3, **extra, **settings}  # 3 rows beyond the tokenizer: padding
    tensors = random_tensors(config, family, np.random.default_rng(seed))
    if wrapped:
        tensors = {"language_model." + k: v for k, v in tensors.items()}
        tensors["vision_tower.patch_embedding.weight"] = np.ones((4, 4), np.float32)
        config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                  "text_config": {**config, "model_type": "gemma3_text"}}
    else:
        config = {"architectures": [model_class], "model_type": family, **config}
    _write_json(folder / "config.json", config)
    half = len(tensors) // 2  # two shards and an index, as large checkpoints come
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, members in shards.items():
        save_file({n: tensors[n].astype(dtype) for n in members}, folder / file)
    _write_json(folder / "model.safetensors.index.json",
                {"weight_map": {n: file for file, members in shards.items() for n in members}})
    return folder


def random_tensors(config: dict, family: str, rng) -> dict[str, np.ndarray]:
    rand = lambda *shape, scale=0.08: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    d, ff, n_vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim", d // config["num_attention_heads"])
    q_dim, kv_dim = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    norm_center = 0.0 if family == "gemma3" else 1.0  # Gemma stores w - 1
    norm = lambda n: (norm_center + rand(n, scale=0.1)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": rand(n_vocab, d, scale=0.5), "model.norm.weight": norm(d)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = rand(n_vocab, d)
        if family in JUDGED_BY_LLAMA_CPP:  # compared with llama.cpp's top-1: a clear winner, not a near-tie
            t["lm_head.weight"] += _clear_winners(t["model.embed_tokens.weight"], rng)
    if family == "deepseek2":
        return t | _deepseek_tensors(config, rand, norm)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
              p + "self_attn.q_proj.weight": rand(q_dim, d), p + "self_attn.k_proj.weight": rand(kv_dim, d),
              p + "self_attn.v_proj.weight": rand(kv_dim, d), p + "self_attn.o_proj.weight": rand(d, q_dim)}
        if family in MOE_FAMILIES:
            t |= _expert_tensors(config, family, p, rand)
        else:
            t |= {p + "mlp.gate_proj.weight": rand(ff, d), p + "mlp.up_proj.weight": rand(ff, d),
                  p + "mlp.down_proj.weight": rand(d, ff)}
        if family in ("qwen2", "qwen2moe"):
            t |= {p + f"self_attn.{x}_proj.bias": rand(n, scale=0.3) for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))}
        if family == "olmoe":  # one norm over all of Q, one over all of K
            t |= {p + "self_attn.q_norm.weight": norm(q_dim), p + "self_attn.k_norm.weight": norm(kv_dim)}
        if family in ("qwen3", "qwen3moe", "gemma3"):
            t |= {p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)}
        if family == "gemma3":
            t |= {p + "pre_feedforward_layernorm.weight": norm(d), p + "post_feedforward_layernorm.weight": norm(d)}
        if family == "phi3":  # Q, K, V in one matrix; gate and up in another
            qkv = [t.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
            gate_up = [t.pop(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
            t[p + "self_attn.qkv_proj.weight"] = np.concatenate(qkv)
            t[p + "mlp.gate_up_proj.weight"] = np.concatenate(gate_up)
    return t


def _unfused(w: dict, p: str, q_dim: int, kv_dim: int) -> dict:
    """Phi-3's fused matrices split back into the names the forward reads."""
    w = dict(w)
    q, k, v = np.split(w.pop(p + "self_attn.qkv_proj.weight"), [q_dim, q_dim + kv_dim])
    gate, up = np.split(w.pop(p + "mlp.gate_up_proj.weight"), 2)
    return w | {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up}


MOE_FAMILIES = ("qwen2moe", "qwen3moe", "mixtral", "olmoe")  # the llama-like layers with experts
# tested against llama.cpp's logits (no real model here; qwen2 for YaRN)
JUDGED_BY_LLAMA_CPP = (*MOE_FAMILIES, "phi3", "deepseek2", "qwen2")
ROUTER_SCALE = 0.6  # routers' weights: scores far apart, so no expert is chosen by a rounding's luck


def _expert_tensors(config: dict, family: str, p: str, rand) -> dict[str, np.ndarray]:
    """A layer's router and experts (and Qwen2-MoE's shared expert) in the family's Hugging Face names."""
    d = config["hidden_size"]
    if family == "mixtral":
        n_expert, ff = config["num_local_experts"], config["intermediate_size"]
        t = {p + "block_sparse_moe.gate.weight": rand(n_expert, d, scale=ROUTER_SCALE)}
        for e in range(n_expert):
            q = p + f"block_sparse_moe.experts.{e}."
            t |= {q + "w1.weight": rand(ff, d), q + "w3.weight": rand(ff, d), q + "w2.weight": rand(d, ff)}
        return t
    n_expert, ff = config["num_experts"], config.get("moe_intermediate_size", config["intermediate_size"])
    t = {p + "mlp.gate.weight": rand(n_expert, d, scale=ROUTER_SCALE)}
    for e in range(n_expert):
        q = p + f"mlp.experts.{e}."
        t |= {q + "gate_proj.weight": rand(ff, d), q + "up_proj.weight": rand(ff, d),
              q + "down_proj.weight": rand(d, ff)}
    if family == "qwen2moe":
        sff, q = config["shared_expert_intermediate_size"], p + "mlp.shared_expert."
        t |= {q + "gate_proj.weight": rand(sff, d), q + "up_proj.weight": rand(sff, d),
              q + "down_proj.weight": rand(d, sff), p + "mlp.shared_expert_gate.weight": rand(1, d, scale=0.3)}
    return t


def _clear_winners(embed: np.ndarray, rng) -> np.ndarray:
    """Output rows that make each token's embedding, carried by the residual stream, vote for one other token
    (a seeded permutation) well above the rest, as trained models are sure of most next tokens."""
    return (0.3 * embed[rng.permutation(len(embed))]).astype(np.float32)


def _deepseek_tensors(config: dict, rand, norm) -> dict[str, np.ndarray]:
    """DeepSeek-V2's layers: latent attention (with q_lora_rank or without), dense leading layers, then
    routed and shared experts."""
    d, n_head = config["hidden_size"], config["num_attention_heads"]
    nope, n_rot, v_head = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kv_lora, q_lora = config["kv_lora_rank"], config.get("q_lora_rank")
    n_expert, ff, sff = config["n_routed_experts"], config["moe_intermediate_size"], config["intermediate_size"]
    t = {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        t |= {p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
              a + "kv_a_proj_with_mqa.weight": rand(kv_lora + n_rot, d), a + "kv_a_layernorm.weight": norm(kv_lora),
              a + "kv_b_proj.weight": rand(n_head * (nope + v_head), kv_lora, scale=0.15),
              a + "o_proj.weight": rand(d, n_head * v_head)}
        if q_lora:
            t |= {a + "q_a_proj.weight": rand(q_lora, d), a + "q_a_layernorm.weight": norm(q_lora),
                  a + "q_b_proj.weight": rand(n_head * (nope + n_rot), q_lora, scale=0.15)}
        else:
            t[a + "q_proj.weight"] = rand(n_head * (nope + n_rot), d)
        if i < config["first_k_dense_replace"]:
            t |= {p + "mlp.gate_proj.weight": rand(sff, d), p + "mlp.up_proj.weight": rand(sff, d),
                  p + "mlp.down_proj.weight": rand(d, sff)}
            continue
        t[p + "mlp.gate.weight"] = rand(n_expert, d, scale=ROUTER_SCALE)
        if config.get("topk_method") == "noaux_tc":  # V3: a bias that steers the choice of experts
            t[p + "mlp.gate.e_score_correction_bias"] = rand(n_expert, scale=0.3)
        for e in range(n_expert):
            q = p + f"mlp.experts.{e}."
            t |= {q + "gate_proj.weight": rand(ff, d), q + "up_proj.weight": rand(ff, d),
                  q + "down_proj.weight": rand(d, ff)}
        shared, q = ff * config["n_shared_experts"], p + "mlp.shared_experts."
        t |= {q + "gate_proj.weight": rand(shared, d), q + "up_proj.weight": rand(shared, d),
              q + "down_proj.weight": rand(d, shared)}
    return t


def _rope_pairs(x, pos, base, scaling=None):  # [n, heads, d]: DeepSeek's rotary parts, adjacent pairs (interleaved)
    halves = np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)  # its modeling code de-interleaves first
    return _rope_halves(halves, pos, base, scaling)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _softmax_scale(config: dict, head_size: int) -> float:
    """DeepSeek's attention scale: 1/sqrt(head size), times YaRN's mscale(factor, mscale_all_dim) squared."""
    scaling = config.get("rope_scaling") or {}
    mscale_all_dim = scaling.get("mscale_all_dim")
    mscale = _yarn_get_mscale(scaling["factor"], mscale_all_dim) if mscale_all_dim else 1.0
    return head_size ** -0.5 * mscale * mscale


def deepseek_forward(w: dict, config: dict, ids: list[int]) -> np.ndarray:
    """DeepSeek-V2 as its modeling code runs it: each head's keys and values decompressed from the latent
    (no absorption), shared experts ungated, the routed weights scaled."""
    d, n_head, eps, n = config["hidden_size"], config["num_attention_heads"], config["rms_norm_eps"], len(ids)
    nope, n_rot, v_head = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kv_lora = config["kv_lora_rank"]
    pos = np.arange(n, dtype=np.float64)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        h = _rmsnorm(x, w[p + "input_layernorm.weight"], eps, False)
        if config.get("q_lora_rank"):
            q_a = _rmsnorm(h @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], eps, False)
            q = q_a @ w[a + "q_b_proj.weight"].T
        else:
            q = h @ w[a + "q_proj.weight"].T
        q = q.reshape(n, n_head, nope + n_rot)
        compressed = h @ w[a + "kv_a_proj_with_mqa.weight"].T
        latent = _rmsnorm(compressed[:, :kv_lora], w[a + "kv_a_layernorm.weight"], eps, False)
        kv = (latent @ w[a + "kv_b_proj.weight"].T).reshape(n, n_head, nope + v_head)
        rope = lambda x: _rope_pairs(x, pos, config["rope_theta"], config.get("rope_scaling"))  # noqa: E731
        k_pe = np.repeat(rope(compressed[:, None, kv_lora:]), n_head, axis=1)
        q = np.concatenate([q[..., :nope], rope(q[..., nope:])], axis=-1)
        k = np.concatenate([kv[..., :nope], k_pe], axis=-1)
        scores = np.einsum("qhd,khd->hqk", q, k) * _softmax_scale(config, nope + n_rot)
        scores = np.where((pos[:, None] < pos[None, :])[None], -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", probs, kv[..., nope:]).reshape(n, -1) @ w[a + "o_proj.weight"].T
        h = _rmsnorm(x, w[p + "post_attention_layernorm.weight"], eps, False)
        if i < config["first_k_dense_replace"]:
            x = x + _silu_ffn(h, *(w[p + f"mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj")))
            continue
        if config.get("topk_method") == "noaux_tc":
            routed = _routed_v3(w, config, p, h)
        else:
            routed = _routed(w, h, config["num_experts_per_tok"], config["norm_topk_prob"],
                             ("gate_proj", "up_proj", "down_proj"), p + "mlp.gate.weight", p + "mlp.experts.")
        x = x + routed * config["routed_scaling_factor"]
        q = p + "mlp.shared_experts."
        x = x + _silu_ffn(h, w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"])
    x = _rmsnorm(x, w["model.norm.weight"], eps, False)
    return x @ w["lm_head.weight"].T


def _silu_ffn(h, gate, up, down):  # transformers' gated MLP: down(silu(gate(h)) * up(h))
    g = h @ gate.T
    return (g / (1 + np.exp(-g)) * (h @ up.T)) @ down.T


def _routed(w: dict, h: np.ndarray, k: int, normalize: bool, names, router: str, experts: str) -> np.ndarray:
    """The routed experts' weighted sum: softmax over the router, top k, optionally renormalized."""
    scores = h @ w[router].T
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    for t in range(len(h)):
        top = np.argsort(-probs[t])[:k]
        weights = probs[t, top] / (probs[t, top].sum() if normalize else 1.0)
        for e, weight in zip(top, weights):
            gate, up, down = (w[experts + f"{e}.{name}.weight"] for name in names)
            out[t] += weight * _silu_ffn(h[t : t + 1], gate, up, down)[0]
    return out


def _routed_v3(w: dict, config: dict, p: str, h: np.ndarray) -> np.ndarray:
    """DeepSeek-V3's MoEGate (noaux_tc): sigmoid scores, plus the correction bias to choose; the groups whose
    two best sum highest kept; top k of the kept; their unbiased scores as weights, renormalized."""
    scores = 1 / (1 + np.exp(-(h @ w[p + "mlp.gate.weight"].T)))  # [n, n_expert]
    choice = scores + w[p + "mlp.gate.e_score_correction_bias"]
    n_group, k = config["n_group"], config["num_experts_per_tok"]
    out = np.zeros_like(h)
    for t in range(len(h)):
        groups = choice[t].reshape(n_group, -1)
        group_scores = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        kept = np.argsort(-group_scores, kind="stable")[: config["topk_group"]]
        masked = np.full_like(groups, -np.inf)
        masked[kept] = groups[kept]
        top = np.argsort(-masked.reshape(-1), kind="stable")[:k]
        weights = scores[t, top] / scores[t, top].sum()
        for e, weight in zip(top, weights):
            q = p + f"mlp.experts.{e}."
            expert = (w[q + f"{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))
            out[t] += weight * _silu_ffn(h[t : t + 1], *expert)[0]
    return out


def _moe_forward(w: dict, config: dict, family: str, p: str, h: np.ndarray) -> np.ndarray:
    """transformers' sparse MoE blocks: softmax over the router, top k, (renormalized), weighted experts."""
    if family == "mixtral":
        router, experts, names = p + "block_sparse_moe.gate.weight", p + "block_sparse_moe.experts.", ("w1", "w3", "w2")
        k, normalize = config["num_experts_per_tok"], True
    else:
        router, experts, names = p + "mlp.gate.weight", p + "mlp.experts.", ("gate_proj", "up_proj", "down_proj")
        k, normalize = config["num_experts_per_tok"], config["norm_topk_prob"]
    out = _routed(w, h, k, normalize, names, router, experts)
    if family == "qwen2moe":
        q = p + "mlp.shared_expert."
        shared = _silu_ffn(h, w[q + "gate_proj.weight"], w[q + "up_proj.weight"], w[q + "down_proj.weight"])
        out += shared / (1 + np.exp(-(h @ w[p + "mlp.shared_expert_gate.weight"].T)))
    return out


# ---------------------------------------------------------------------------- Hugging Face-style forward

def _rmsnorm(x, w, eps, gemma):  # [n, d] -> [n, d]
    scale = (1.0 + w) if gemma else w
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _llama3_inv_freq(inv, scaling):
    """transformers' _compute_llama3_parameters."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, blended, scaled)


def _yarn_inv_freq(inv, scaling, dim, base):
    """transformers' _compute_yarn_parameters (DeepSeek's YarnRotaryEmbedding is the same): the frequencies,
    each between its interpolated and extrapolated value by a ramp over the correction range, and the
    factor on cos and sin."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        magnitude = scaling["attention_factor"]
    elif mscale and mscale_all_dim:
        magnitude = _yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim)
    else:
        magnitude = _yarn_get_mscale(factor)
    corr = lambda rotations: dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    low = max(math.floor(corr(scaling.get("beta_fast") or 32)), 0)
    high = min(math.ceil(corr(scaling.get("beta_slow") or 1)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low if high != low else 0.001), 0, 1)
    extrapolation = 1 - ramp
    return inv / factor * (1 - extrapolation) + inv * extrapolation, magnitude


def _rope_halves(x, pos, base, scaling=None):  # [n, heads, hd]: Hugging Face's rotate_half
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    magnitude = 1.0
    kind = scaling and scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        inv = _llama3_inv_freq(inv, scaling)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "yarn":
        inv, magnitude = _yarn_inv_freq(inv, scaling, hd, base)
    ang = pos[:, None, None] * inv[None, None, :]
    cos, sin = np.cos(ang) * magnitude, np.sin(ang) * magnitude
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def hf_forward(tensors: dict[str, np.ndarray], config: dict, family: str, ids: list[int]) -> np.ndarray:
    """float64 logits [n, vocab] of `ids` from a checkpoint's own tensors and config."""
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    if family == "deepseek2":
        return deepseek_forward(w, config, ids)
    gemma = family == "gemma3"
    d, n_head, n_kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, eps, n = config.get("head_dim", d // n_head), config["rms_norm_eps"], len(ids)
    pos = np.arange(n, dtype=np.float64)
    x = w["model.embed_tokens.weight"][ids] * (math.sqrt(d) if gemma else 1.0)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = gemma and (i + 1) % 6 != 0
        if family == "phi3":
            w = _unfused(w, p, n_head * hd, n_kv * hd)
        h = _rmsnorm(x, w[p + "input_layernorm.weight"], eps, gemma)
        q, k, v = (h @ w[p + f"self_attn.{s}_proj.weight"].T + w.get(p + f"self_attn.{s}_proj.bias", 0.0)
                   for s in "qkv")
        if family == "olmoe":
            q = _rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps, False)
            k = _rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps, False)
        q, k, v = q.reshape(n, n_head, hd), k.reshape(n, n_kv, hd), v.reshape(n, n_kv, hd)
        if family in ("qwen3", "qwen3moe", "gemma3"):
            q = _rmsnorm(q, w[p + "self_attn.q_norm.weight"], eps, gemma)
            k = _rmsnorm(k, w[p + "self_attn.k_norm.weight"], eps, gemma)
        base = config["rope_local_base_freq"] if sliding else config["rope_theta"]
        scaling = config.get("rope_scaling")
        rot = int(hd * config.get("partial_rotary_factor", 1.0))  # Phi-4-mini: the first three quarters
        q, k = (np.concatenate([_rope_halves(a[..., :rot], pos, base, scaling), a[..., rot:]], axis=-1) for a in (q, k))
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scale = config["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5
        scores = np.einsum("qhd,khd->hqk", q, k) * scale
        distance = pos[:, None] - pos[None, :]
        hidden = (distance < 0) | ((distance >= config["sliding_window"]) if sliding else False)
        scores = np.where(hidden[None], -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(n, n_head * hd) @ w[p + "self_attn.o_proj.weight"].T
        if gemma:
            attn = _rmsnorm(attn, w[p + "post_attention_layernorm.weight"], eps, gemma)
        x = x + attn
        h = _rmsnorm(x, w[p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")],
                     eps, gemma)
        if family in MOE_FAMILIES:
            x = x + _moe_forward(w, config, family, p, h)
            continue
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        act = (0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) if gemma
               else gate / (1 + np.exp(-gate)))
        f = (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        if gemma:
            f = _rmsnorm(f, w[p + "post_feedforward_layernorm.weight"], eps, gemma)
        x = x + f
    x = _rmsnorm(x, w["model.norm.weight"], eps, gemma)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
