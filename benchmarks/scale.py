"""How llamba's speed scales with model size, against llama-cpp-python measured in the same run.

    python benchmarks/scale.py [--model 0.5b --model 1.5b --model 3b --model 8b] [--types Q4_K_M,Q4_0]
                               [-n 12] [--prompt 48] [--repeats 3] [--ttft/--no-ttft]

Models: the Qwen2.5-Coder 0.5B and 1.5B test files, and random-weight GGUFs at the exact tensor shapes of a
real Qwen2.5-3B (36 layers, 2048 wide, 16 / 2 heads of 128, ffn 11008, vocab 151936, untied) and
Llama-3.1-8B (32 layers, 4096 wide, 32 / 8 heads of 128, ffn 14336, vocab 128256, untied), in the type mixes
llama-quantize makes: Q4_K_M (attn_v and ffn_down Q6_K in the layers its use_more_bits picks, output Q6_K,
the rest Q4_K), Q4_0 (output Q6_K) and Q8_0. The random files are written once (random blocks with small,
finite float16 scales), under --cache-dir; the tokenizer is the 1.5B's (truncated to 128256 tokens for the
Llama shape: speed does not depend on it, llama.cpp only needs one to load).

Per model and thread count, both engines stay loaded and alternate within every repeat (this machine's
speed drifts by 10-30% over seconds). tg: the median seconds per single-token forward after an 8-token
prompt; pp: one forward of --prompt tokens. Bytes read per token: llamba's are its lanes matrices' nbytes
(every layer matrix and the output; an untied embedding stays in the file, a row per token), llama.cpp's are
the file's tensor bytes minus token_embd when untied. GB/s = those bytes x tok/s; the machine's read
bandwidth (bandwidth.read_bandwidth, best of 5) at each thread count bounds both. --ttft: the time to the
first token of a 1,000-token prompt on the 1.5B, through each engine's own prompt path (llamba's
stream_tokens, llama.cpp's eval + sample).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import read_bandwidth  # noqa: E402

from llamba.bench import LlamaCppRunner  # noqa: E402
from llamba.formats.gguf import open_gguf  # noqa: E402
from llamba.models import load_transformer  # noqa: E402
from llamba.ops.threads import ThreadGovernor, set_threads  # noqa: E402
from llamba.memory.kv_cache import KVCache  # noqa: E402
from llamba.store import resolve_model  # noqa: E402

REAL = {"0.5b": "qwen2.5-coder-0.5b", "1.5b": "qwen2.5-coder-1.5b"}  # the store's names (pulled when missing)
TTFT_REPEATS = 2


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    rope_base: float
    rms_eps: float


SHAPES = {
    "3b": ("Qwen2.5-3B", Shape("qwen2", 36, 2048, 16, 2, 128, 11008, 151936, 1e6, 1e-6)),
    "8b": ("Llama-3.1-8B", Shape("llama", 32, 4096, 32, 8, 128, 14336, 128256, 5e5, 1e-5)),
}
# f16 scale fields per block type (byte offsets) and a typical size: weights of about 0.02, finite sums
SCALES = {"Q4_0": ([0], 4e-3), "Q8_0": ([0], 3e-4), "Q4_K": ([0, 2], 1e-4), "Q6_K": ([208], 2e-5)}
BLOCK = {"Q4_0": (32, 18), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}
FILE_TYPE = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (llama-quant.cpp) for the layers Q4_K_M gives Q6_K attn_v and ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(s: Shape, mix: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape [rows, cols], type) in file order, as llama-quantize would type them."""
    base = "Q4_K" if mix == "Q4_K_M" else mix
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    plan = [("token_embd.weight", (s.n_vocab, s.n_embd), base)]
    for i in range(s.n_layer):
        more = "Q6_K" if mix == "Q4_K_M" and _use_more_bits(i, s.n_layer) else base
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (s.n_embd,), "F32"),
                 (p + "attn_q.weight", (q, s.n_embd), base),
                 (p + "attn_k.weight", (kv, s.n_embd), base),
                 (p + "attn_v.weight", (kv, s.n_embd), more)]
        if s.arch == "qwen2":
            plan += [(p + f"attn_{x}.bias", (n,), "F32") for x, n in (("q", q), ("k", kv), ("v", kv))]
        plan += [(p + "attn_output.weight", (s.n_embd, q), base),
                 (p + "ffn_norm.weight", (s.n_embd,), "F32"),
                 (p + "ffn_gate.weight", (s.n_ff, s.n_embd), base),
                 (p + "ffn_up.weight", (s.n_ff, s.n_embd), base),
                 (p + "ffn_down.weight", (s.n_embd, s.n_ff), more)]
    plan += [("output_norm.weight", (s.n_embd,), "F32"),
             ("output.weight", (s.n_vocab, s.n_embd), "Q8_0" if mix == "Q8_0" else "Q6_K")]
    return plan


def _random_tensor(rng, name: str, shape: tuple[int, ...], type_name: str) -> np.ndarray:
    if type_name == "F32":
        return (np.zeros if name.endswith(".bias") else np.ones)(shape, np.float32)
    elements, block_bytes = BLOCK[type_name]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows * cols // elements, block_bytes), dtype=np.uint8)
    at_offsets, size = SCALES[type_name]
    for at in at_offsets:
        scale = rng.uniform(0.5 * size, 1.5 * size, (len(blocks), 1)).astype("<f2")
        blocks[:, at : at + 2] = scale.view(np.uint8)
    return blocks.reshape(rows, cols // elements * block_bytes)


def _tokenizer(n_vocab: int) -> dict:
    m = open_gguf(resolve_model(REAL["1.5b"])).metadata
    tokens, types = list(m["tokenizer.ggml.tokens"]), np.asarray(m["tokenizer.ggml.token_type"], np.int32)
    merges = list(m["tokenizer.ggml.merges"])
    ids = {k: m[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "padding")}
    if n_vocab < len(tokens):  # a smaller vocabulary: keep the first tokens and the merges among them
        tokens, types = tokens[:n_vocab], types[:n_vocab].copy()
        tokens[-1], types[-1] = "<|endoftext|>", 3  # a control token for BOS/EOS
        known = set(tokens)
        merges = [mg for mg in merges if "".join(mg.split(" ")) in known and all(p in known for p in mg.split(" "))]
        ids = {k: n_vocab - 1 for k in ids}
    return {"model": m["tokenizer.ggml.model"], "pre": m["tokenizer.ggml.pre"], "tokens": tokens,
            "types": types.tolist(), "merges": merges, "ids": ids}


def write_random_gguf(path: Path, label: str, s: Shape, mix: str, seed: int = 0) -> None:
    """A GGUF with llama.cpp-loadable metadata and random weights, tensor by tensor (never all in memory)."""
    import gguf

    plan = tensor_plan(s, mix)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp, s.arch)
    w.add_name(f"random {label} {mix}")
    w.add_context_length(32768)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    if s.arch == "llama":
        w.add_rope_dimension_count(s.head_dim)
        w.add_vocab_size(s.n_vocab)
    w.add_file_type(FILE_TYPE[mix])
    w.add_quantization_version(2)
    add_tokenizer(w, s.n_vocab)
    w.add_add_bos_token(False)
    write_tensors(w, plan, _random_tensor, seed, tmp, path)


def add_tokenizer(w, n_vocab: int) -> None:
    """The 1.5B's BPE vocabulary cut to n_vocab tokens, into a GGUF writer."""
    tok = _tokenizer(n_vocab)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["ids"]["bos"])
    w.add_eos_token_id(tok["ids"]["eos"])
    w.add_pad_token_id(tok["ids"]["padding"])


def write_tensors(w, plan, make_tensor, seed: int, tmp: Path, path: Path) -> None:
    """Write the plan's tensors (name, shape, type: "F32" and "ROUTER" are float32; 2-D or stacked 3-D blocks)
    one at a time (never the whole model in memory), then move the file into place."""
    import gguf

    for name, shape, type_name in plan:
        if type_name in ("F32", "ROUTER"):
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            elements, block_bytes = BLOCK[type_name]
            byte_shape = (*shape[:-1], shape[-1] // elements * block_bytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, type_name in plan:
        w.write_tensor_data(make_tensor(rng, name, shape, type_name))
    w.close()
    os.replace(tmp, path)


def model_path(key: str, mix: str, cache_dir: Path) -> Path:
    if key in REAL:
        return Path(resolve_model(REAL[key]))
    label, shape = SHAPES[key]
    path = cache_dir / f"random-{label.lower()}-{mix.lower()}.gguf"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        click.echo(f"writing {path} (once) ...", err=True)
        started = time.perf_counter()
        write_random_gguf(path, label, shape, mix)
        click.echo(f"  {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", err=True)
    return path


def bytes_per_token(model) -> tuple[int, int]:
    """(llamba's lanes bytes per decoded token, llama.cpp's file bytes per token)."""
    ours = sum(w.nbytes for w in [model.output] + [m for layer in model.layers for m in layer.matrices])
    tensors = model.gguf.tensors
    theirs = sum(t.n_bytes for t in tensors.values())
    if "output.weight" in tensors:
        theirs -= tensors["token_embd.weight"].n_bytes
    return ours, theirs


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class Engines:
    """llamba's forward at a fixed thread count and llama-cpp-python on the same file, side by side."""

    def __init__(self, path: Path, n_ctx: int):
        self.model = load_transformer(path)
        self.cache = KVCache.for_model(self.model.hp, n_ctx)
        self.peer = LlamaCppRunner(path, 2, n_ctx=n_ctx)
        self.n_vocab = self.model.hp.n_vocab

    def set_threads(self, threads: int) -> None:
        import llama_cpp

        set_threads(threads)
        self.model.threads = ThreadGovernor(fixed=threads)
        llama_cpp.llama_set_n_threads(self.peer.llm.ctx, threads, threads)

    def tg_llamba(self, ids: list[int], context: int = 8) -> float:
        self.cache.trim(0)
        self.model.forward_tokens(ids[:context], 0, self.cache)
        return statistics.median(_timed(lambda: self.model.forward_tokens([t], context + i, self.cache))
                                 for i, t in enumerate(ids[context:]))

    def tg_llama_cpp(self, ids: list[int], context: int = 8) -> float:
        llm = self.peer.llm
        llm.reset()
        llm.eval(ids[:context])
        return statistics.median(_timed(lambda: llm.eval([t])) for t in ids[context:])

    def pp_llamba(self, ids: list[int]) -> float:
        self.cache.trim(0)
        return _timed(lambda: self.model.forward_tokens(ids, 0, self.cache))

    def pp_llama_cpp(self, ids: list[int]) -> float:
        self.peer.llm.reset()
        return _timed(lambda: self.peer.llm.eval(ids))


def measure(engines: Engines, threads: int, n_gen: int, n_prompt: int, repeats: int, pp: bool):
    rng = np.random.default_rng(threads)
    gen = rng.integers(100, min(engines.n_vocab, 100000), 8 + n_gen).tolist()
    prompt = rng.integers(100, min(engines.n_vocab, 100000), n_prompt).tolist()
    engines.set_threads(threads)
    engines.tg_llamba(gen[:12]), engines.tg_llama_cpp(gen[:12])  # warm-up (and page-in for llama.cpp)
    tg = {"llamba": [], "llama.cpp": []}
    for _ in range(repeats):
        tg["llamba"].append(engines.tg_llamba(gen))
        tg["llama.cpp"].append(engines.tg_llama_cpp(gen))
    out = {"tg": {k: 1 / statistics.median(v) for k, v in tg.items()}}
    if pp:
        engines.pp_llamba(prompt[:16]), engines.pp_llama_cpp(prompt[:16])
        times = {"llamba": [], "llama.cpp": []}
        for _ in range(repeats):
            times["llamba"].append(engines.pp_llamba(prompt))
            times["llama.cpp"].append(engines.pp_llama_cpp(prompt))
        out["pp"] = {k: n_prompt / statistics.median(v) for k, v in times.items()}
    return out


def ttft(n_prompt: int, repeats: int, threads: int = 2) -> tuple[float, float]:
    """Seconds to the first token of an n_prompt-token prompt on the 1.5B: (llamba, llama.cpp), medians."""
    from llamba import Llama

    path = resolve_model(REAL["1.5b"])
    llm = Llama(path, n_ctx=n_prompt + 64, n_threads=threads)
    peer = LlamaCppRunner(path, threads, n_ctx=n_prompt + 64)
    rng = np.random.default_rng(1)
    set_threads(threads)

    def ours(ids: list[int]) -> None:
        next(iter(llm.stream_tokens(ids, max_tokens=1, temperature=0.0)))

    def theirs(ids: list[int]) -> None:
        peer.llm.reset()
        peer.llm.eval(ids)
        peer.llm.sample(temp=0.0)

    warm = rng.integers(100, 100000, 16).tolist()
    ours(warm), theirs(warm)  # compiles, pages in
    times = {"llamba": [], "llama.cpp": []}
    for _ in range(repeats):  # a fresh prompt each time: llamba's stream_tokens reuses a cached prefix
        ids = rng.integers(100, 100000, n_prompt).tolist()
        for engine, fn in (("llamba", ours), ("llama.cpp", theirs)):
            times[engine].append(_timed(lambda: fn(ids)))
    return statistics.median(times["llamba"]), statistics.median(times["llama.cpp"])


@click.command()
@click.option("--model", "models", multiple=True, default=["0.5b", "1.5b", "3b", "8b"], show_default=True,
              type=click.Choice([*REAL, *SHAPES]))
@click.option("--types", default="Q4_K_M", show_default=True,
              help="comma-separated mixes for the random 3b/8b files: Q4_K_M, Q4_0, Q8_0 (real files are Q4_K_M)")
@click.option("-n", "n_gen", default=12, show_default=True, help="decoded tokens per tg repeat")
@click.option("--prompt", "n_prompt", default=48, show_default=True, help="tokens per pp repeat")
@click.option("--repeats", default=3, show_default=True)
@click.option("--pp-threads", default="2", show_default=True, help="thread counts at which to measure pp")
@click.option("--ttft/--no-ttft", "ttft_on", default=True, show_default=True)
@click.option("--cache-dir", default=str(Path.home() / ".cache" / "llamba" / "bench-models"), show_default=True)
def main(models, types, n_gen, n_prompt, repeats, pp_threads, ttft_on, cache_dir) -> None:
    mixes = [t.strip().upper() for t in types.split(",") if t.strip()]
    for mix in mixes:
        if mix not in FILE_TYPE:
            raise click.BadParameter(f"unknown mix {mix}: one of {', '.join(FILE_TYPE)}", param_hint="--types")
    pp_at = {int(t) for t in pp_threads.split(",") if t.strip()}
    runs = [(key, "Q4_K_M") for key in models if key in REAL]
    runs += [(key, mix) for mix in mixes for key in models if key in SHAPES]
    paths = {run: model_path(run[0], run[1], Path(cache_dir).expanduser()) for run in runs}  # writes first
    bandwidth = {t: read_bandwidth(t, repeats=5) for t in (1, 2)}  # again at the end: the better of the two
    rows = []
    for key, mix in runs:
        path = paths[(key, mix)]
        name = f"{key} {mix}" + ("" if key in REAL else " (random)")
        click.echo(f"{name}: loading both engines ...", err=True)
        engines = Engines(path, n_ctx=max(n_prompt, 8 + n_gen) + 16)
        ours_b, theirs_b = bytes_per_token(engines.model)
        for threads in (1, 2):
            r = measure(engines, threads, n_gen, n_prompt, repeats, pp=threads in pp_at)
            for test, rates in r.items():
                rows.append([name, path.stat().st_size, ours_b, theirs_b, test, threads, rates, 0.0])
                click.echo(f"  {test} {threads}t: llamba {rates['llamba']:.2f}, llama.cpp {rates['llama.cpp']:.2f} t/s",
                           err=True)
        del engines
        gc.collect()
    bandwidth = {t: max(bw, read_bandwidth(t, repeats=5)) for t, bw in bandwidth.items()}
    for row in rows:
        row[-1] = bandwidth[row[5]]
    load = os.getloadavg()
    click.echo(f"read bandwidth (STREAM-style sum, best of 5 before and 5 after): 1 thread {bandwidth[1]:.1f} GB/s, "
               f"2 threads {bandwidth[2]:.1f} GB/s; tg {n_gen} tokens after 8, pp {n_prompt}, "
               f"median of {repeats} interleaved repeats; load average at the end {load[0]:.2f}\n")
    click.echo("| model | file GB | read/token llamba / llama.cpp MB | test | threads | llamba t/s | llama.cpp t/s | "
               "ratio llamba / llama.cpp | llamba GB/s | llama.cpp GB/s | read bandwidth GB/s | "
               "llamba / llama.cpp share |")
    click.echo("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, file_bytes, ours_b, theirs_b, test, threads, rates, bw in rows:
        ours, theirs = rates["llamba"], rates["llama.cpp"]
        if test == "tg":
            gbs = (ours_b * ours / 1e9, theirs_b * theirs / 1e9)
            traffic = f"{gbs[0]:.1f} | {gbs[1]:.1f} | {bw:.1f} | {gbs[0] / bw:.0%} / {gbs[1] / bw:.0%}"
        else:
            traffic = "- | - | - | -"  # a prompt reads the weights once for all its tokens: compute-bound
        click.echo(f"| {name} | {file_bytes / 1e9:.2f} | {ours_b / 1e6:.0f} / {theirs_b / 1e6:.0f} | "
                   f"{test}{n_gen if test == 'tg' else n_prompt} | {threads} | {ours:.2f} | {theirs:.2f} | "
                   f"{ours / theirs:.2f} | {traffic} |")
    if ttft_on:
        ours, theirs = ttft(1000, repeats=TTFT_REPEATS)
        click.echo(f"\ntime to first token, 1,000-token prompt, Qwen2.5-Coder-1.5B Q4_K_M, 2 threads "
                   f"(median of {TTFT_REPEATS}): "
                   f"llamba {ours:.2f} s, llama.cpp {theirs:.2f} s (ratio {theirs / ours:.2f} in llamba's favour "
                   f"when > 1)")


if __name__ == "__main__":
    main()
