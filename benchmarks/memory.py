"""Resident memory while loading and generating, llamba and llama-cpp-python, against the budget
file size + KV cache + 150 MiB.

    python benchmarks/memory.py [--model smollm2-135m --model PATH ...] [--tokens 64] [--runs 2]

Each measurement is a fresh process (this script with --child): load the model, generate --tokens tokens
from a short prompt. The parent polls the child's /proc/PID/status every few milliseconds and keeps the
sample with the largest VmRSS, so the anonymous (RssAnon: llamba's repacked weights, KV cache, heaps) and
file-backed (RssFile: mapped pages of the model and the libraries) shares are those at the peak, including
the load; the child reports its own VmHWM (the kernel's peak) at the end. Run 1 is the first load, run 2 a
later one (llamba repacks at every load, so they should match). "on disk" is what llamba keeps in
$LLAMBA_HOME besides models/ (the benchmarks' bench-models/ is not llamba's and is left out): it should be
0. llama.cpp gets the same context size as llamba's default and its own KV cache (f16) in its budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALLOWANCE = 150 * 2**20
DEFAULT_MODELS = ["smollm2-135m", "/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                  "/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]
PROMPT = "Once upon a time"


def status(pid: int | str = "self") -> dict[str, int]:
    """The byte counts of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_bytes() -> int:
    return status()["VmRSS"]


def llamba_disk_bytes() -> tuple[int, list[str]]:
    """Bytes of the files in $LLAMBA_HOME outside models/ (and outside the benchmarks' bench-models/)."""
    from llamba.store import llamba_home

    root = llamba_home()
    skip = ("models", "bench-models")
    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in skip]
    return sum(p.stat().st_size for p in files), [str(p.relative_to(root)) for p in files]


def child_llamba(model: str, tokens: int) -> dict:
    started = time.perf_counter()
    from llamba.api import Llama

    llm = Llama(model)
    loaded = time.perf_counter() - started
    ids = llm.tokenize(PROMPT)
    n = sum(1 for _ in llm.stream_tokens(ids, max_tokens=tokens, temperature=0.8, seed=0))
    hp = llm.model.hp
    return {"path": str(llm.model_path), "n_ctx": llm.n_ctx, "kv": llm.cache.nbytes, "load_s": loaded,
            "generated": n, "n_layer": hp.n_layer, "kv_dim": hp.kv_dim}


def child_llama_cpp(model: str, tokens: int, n_ctx: int) -> dict:
    started = time.perf_counter()
    from llama_cpp import Llama as LlamaCpp

    llm = LlamaCpp(model, n_ctx=n_ctx, n_threads=2, verbose=False)
    loaded = time.perf_counter() - started
    n = sum(1 for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.8, seed=0, stream=True))
    return {"path": model, "n_ctx": n_ctx, "load_s": loaded, "generated": n}


def run_child(engine: str, model: str, tokens: int, n_ctx: int) -> dict:
    """One fresh process; the peak-VmRSS sample of its status, polled from here."""
    cmd = [sys.executable, __file__, "--child", engine, "--model", model, "--tokens", str(tokens), "--ctx", str(n_ctx)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak: dict[str, int] = {"VmRSS": 0}
    while proc.poll() is None:
        try:
            s = status(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        if s.get("VmRSS", 0) > peak["VmRSS"]:
            peak = s
        time.sleep(0.003)
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{engine} child on {model} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss=peak["VmRSS"], peak_anon=peak.get("RssAnon", 0), peak_file=peak.get("RssFile", 0))
    return result


def child_main(args) -> None:
    model = args.model[0]
    result = child_llamba(model, args.tokens) if args.child == "llamba" else \
        child_llama_cpp(model, args.tokens, args.ctx)
    result["hwm"] = status()["VmHWM"]  # the kernel's peak over this process's life
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a registry name or a GGUF path (repeatable)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per engine and model: first, later")
    parser.add_argument("--child", choices=["llamba", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    mib = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    disk_before, _ = llamba_disk_bytes()
    rows = []
    for model in args.model or DEFAULT_MODELS:
        runs = {"llamba": [], "llama.cpp": []}
        for run in range(args.runs):  # alternate: each engine's later load comes after the other's
            first = run_child("llamba", model, args.tokens, 0)
            runs["llamba"].append(first)
            runs["llama.cpp"].append(run_child("llama.cpp", first["path"], args.tokens, first["n_ctx"]))
        file_bytes = os.path.getsize(runs["llamba"][0]["path"])
        info = runs["llamba"][0]
        kv_f16 = 2 * info["n_layer"] * info["n_ctx"] * info["kv_dim"] * 2  # llama.cpp's default K and V types
        for engine, results in runs.items():
            kv = info["kv"] if engine == "llamba" else kv_f16
            budget = file_bytes + kv + ALLOWANCE
            for run, r in enumerate(results, 1):
                rows.append((Path(info["path"]).name, engine, run, r, file_bytes, kv, budget))
        print(f"{Path(info['path']).name} done", file=sys.stderr, flush=True)
    disk_after, files = llamba_disk_bytes()
    print(f"tokens generated per run {args.tokens}; load average at the end {os.getloadavg()[0]:.2f}; "
          f"llamba's bytes in $LLAMBA_HOME besides models/: {disk_after} "
          f"(before these runs {disk_before}){': ' + ', '.join(files) if files else ''}\n")
    print("| model | engine | run | context | import + load s | peak RSS MiB (VmHWM) | at peak: anon / file MiB | "
          "file MiB | KV MiB | budget MiB (file + KV + 150) | within | on disk besides the model |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for name, engine, run, r, file_bytes, kv, budget in rows:
        peak = max(r["hwm"], r["peak_rss"])
        disk = f"{disk_after} B" if engine == "llamba" else "-"
        print(f"| {name} | {engine} | {'first' if run == 1 else 'later'} | {r['n_ctx']} | {r['load_s']:.2f} | "
              f"{mib(peak)} | {mib(r['peak_anon'])} / {mib(r['peak_file'])} | {mib(file_bytes)} | {mib(kv)} | "
              f"{mib(budget)} | {'yes' if peak <= budget else 'NO'} | {disk} |")


if __name__ == "__main__":
    main()
