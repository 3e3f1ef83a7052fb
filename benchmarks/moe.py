"""Mixture-of-experts speed against llama-cpp-python on the same file, at Qwen3-30B-A3B's layer shapes.

    python benchmarks/moe.py [--types Q4_K_M,Q8_0] [--layers 6] [-n 12] [--prompt 64] [--repeats 3]

A random-weight `qwen3moe` GGUF with Qwen3-30B-A3B's layers (2048 wide, 32 query / 4 key-value heads of 128
with QK-norm, 128 experts of 768, 8 per token), fewer of them (--layers) so it fits this machine, and a
32,000-token vocabulary (the 1.5B test model's tokenizer, truncated: the output matrix would otherwise
dwarf a few layers). Weights are random blocks with small finite scales (benchmarks/scale.py's), the
routers random normal F32 (so tokens spread over the experts as trained routers spread them), in the
type mixes llama-quantize makes: Q4_K_M (attn_v and ffn_down_exps Q6_K in the layers use_more_bits picks,
output Q6_K, the rest Q4_K) and Q8_0. Written once under --cache-dir.

tg: the median seconds per single-token forward after an 8-token prompt; pp: one forward of --prompt
tokens; both engines loaded side by side and alternating in every repeat (benchmarks/scale.py's Engines).
Active bytes per token: the weights one decoded token reads, every matrix but the experts' whole, the
experts' n_used / n_expert share (the file's bytes, which are llamba's lanes bytes up to the K-quants'
unpacked scales); tok/s per GB of active weights is the speed that size-free figure allows comparing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from scale import FILE_TYPE, Engines, _random_tensor, _use_more_bits, add_tokenizer, measure, write_tensors  # noqa: E402


N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 2048, 32, 4, 128
N_EXPERT, N_USED, N_FF_EXP, N_FF = 128, 8, 768, 6144
N_VOCAB = 32000


def tensor_plan(n_layer: int, mix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, type) in file order; experts [n_expert, rows, cols]."""
    base = "Q4_K" if mix == "Q4_K_M" else mix
    q, kv = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    plan = [("token_embd.weight", (N_VOCAB, N_EMBD), base)]
    for i in range(n_layer):
        more = "Q6_K" if mix == "Q4_K_M" and _use_more_bits(i, n_layer) else base
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (N_EMBD,), "F32"), (p + "attn_q.weight", (q, N_EMBD), base),
                 (p + "attn_k.weight", (kv, N_EMBD), base), (p + "attn_v.weight", (kv, N_EMBD), more),
                 (p + "attn_q_norm.weight", (HEAD_DIM,), "F32"), (p + "attn_k_norm.weight", (HEAD_DIM,), "F32"),
                 (p + "attn_output.weight", (N_EMBD, q), base), (p + "ffn_norm.weight", (N_EMBD,), "F32"),
                 (p + "ffn_gate_inp.weight", (N_EXPERT, N_EMBD), "ROUTER"),
                 (p + "ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), base),
                 (p + "ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, N_EMBD), base),
                 (p + "ffn_down_exps.weight", (N_EXPERT, N_EMBD, N_FF_EXP), more)]
    plan += [("output_norm.weight", (N_EMBD,), "F32"),
             ("output.weight", (N_VOCAB, N_EMBD), "Q8_0" if mix == "Q8_0" else "Q6_K")]
    return plan


def _tensor(rng, name: str, shape: tuple[int, ...], type_name: str) -> np.ndarray:
    if type_name == "ROUTER":
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if len(shape) == 3:  # the experts: random blocks for all their rows, stacked
        return _random_tensor(rng, name, (shape[0] * shape[1], shape[2]), type_name).reshape(shape[0], shape[1], -1)
    return _random_tensor(rng, name, shape, type_name)


def write_random_moe(path: Path, n_layer: int, mix: str, seed: int = 0) -> None:
    """The random qwen3moe file, tensor by tensor (never all in memory)."""
    import gguf

    plan = tensor_plan(n_layer, mix)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, "qwen3moe")
    w.add_name(f"random Qwen3-30B-A3B shapes, {n_layer} layers, {mix}")
    for add, value in ((w.add_context_length, 32768), (w.add_embedding_length, N_EMBD), (w.add_block_count, n_layer),
                       (w.add_feed_forward_length, N_FF), (w.add_head_count, N_HEAD), (w.add_head_count_kv, N_HEAD_KV),
                       (w.add_key_length, HEAD_DIM), (w.add_value_length, HEAD_DIM), (w.add_rope_freq_base, 1e6),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_expert_count, N_EXPERT),
                       (w.add_expert_used_count, N_USED), (w.add_expert_feed_forward_length, N_FF_EXP),
                       (w.add_file_type, FILE_TYPE[mix]), (w.add_quantization_version, 2)):
        add(value)
    add_tokenizer(w, N_VOCAB)
    w.add_add_bos_token(False)
    write_tensors(w, plan, _tensor, seed, tmp, path)


def active_bytes(model) -> int:
    """The file bytes one decoded token reads: every weight matrix but the experts' whole, the experts'
    n_used / n_expert share (token_embd: one row, left out)."""
    total = 0
    for t in model.gguf.tensors.values():
        if t.name == "token_embd.weight" or len(t.shape) < 2:
            continue
        total += t.n_bytes * N_USED // N_EXPERT if len(t.shape) == 3 else t.n_bytes
    return total


@click.command()
@click.option("--types", default="Q4_K_M,Q8_0", show_default=True)
@click.option("--layers", default=6, show_default=True, help="layers of the 48 (each ~340 MB at Q4_K)")
@click.option("-n", "n_gen", default=12, show_default=True, help="tokens timed per decode run")
@click.option("--prompt", "n_prompt", default=64, show_default=True, help="prefill tokens")
@click.option("--repeats", default=3, show_default=True)
@click.option("--cache-dir", default=str(Path.home() / ".cache" / "llamba-bench"), show_default=True)
def main(types, layers, n_gen, n_prompt, repeats, cache_dir) -> None:
    print("| type | file GB | active GB/token | threads | tg llamba | tg llama.cpp | ratio | tok/s per active GB "
          "(llamba / llama.cpp) | pp llamba | pp llama.cpp | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mix in types.split(","):
        path = Path(cache_dir) / f"random-qwen3-30b-a3b-{layers}l-{mix.lower()}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            write_random_moe(path, layers, mix)
            click.echo(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - started:.0f} s)",
                       err=True)
        engines = Engines(path, n_ctx=256)
        active = active_bytes(engines.model) / 1e9
        for threads in (1, 2):
            r = measure(engines, threads, n_gen, n_prompt, repeats, pp=threads == 2)
            tg, pp = r["tg"], r.get("pp")
            pp_cells = (f"{pp['llamba']:.1f} | {pp['llama.cpp']:.1f} | {pp['llamba'] / pp['llama.cpp']:.2f}x"
                        if pp else "| |")
            print(f"| {mix} | {path.stat().st_size / 1e9:.2f} | {active:.3f} | {threads} | {tg['llamba']:.2f} | "
                  f"{tg['llama.cpp']:.2f} | {tg['llamba'] / tg['llama.cpp']:.2f}x | "
                  f"{tg['llamba'] / active:.1f} / {tg['llama.cpp'] / active:.1f} | {pp_cells} |", flush=True)
        del engines


if __name__ == "__main__":
    main()
