"""Decode speed on a busy machine: tg64 in fresh processes of llamba and of llama-cpp-python, with 0, 1 and 2
background processes keeping cores busy, at 1 and 2 threads; min / median / max over the runs.

    python benchmarks/contention.py [--model smollm2-135m] [--runs 10] [--loads 0,1,2] [--threads 1,2]

A laptop is never idle: the slowest run is what a user feels. Every run is a new process (thread placement,
memory layout and the threading layer's start-up differ between processes), and the engines alternate run by
run, so a noisy moment hits both alike.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import click

N_GEN = 64
# One run: load, warm up with 8 tokens, then time 64 tokens of plain decoding one at a time (llama-bench's tg),
# with `llamba bench`'s runners.
RUN = """
import time, numpy as np
from llamba.bench import LlamaCppRunner, LlambaRunner
from llamba.store import resolve_model
if {engine!r} == "memory":
    import sys, numba
    sys.path.insert(0, {here!r})
    from bandwidth import _stream_sum
    numba.set_num_threads({threads})
    weights = np.ones(64 * 2**20, np.float32)  # 256 MB: Gemma's bytes per token
    _stream_sum(weights, 64)
    started = time.perf_counter()
    for _ in range({n}):
        _stream_sum(weights, 64)
    print({n} * weights.nbytes / (time.perf_counter() - started) / 1e9)
    raise SystemExit
if {engine!r} == "llamba":
    from llamba import Llama
    runner = LlambaRunner(Llama({model!r}, n_threads={threads}))
    n_vocab = runner.model.hp.n_vocab
else:
    runner = LlamaCppRunner(resolve_model({model!r}), {threads})
    n_vocab = runner.llm.n_vocab()
ids = np.random.default_rng(0).integers(100, n_vocab, {n}).tolist()
runner.generate(ids[:8])
started = time.perf_counter()
runner.generate(ids)
print({n} / (time.perf_counter() - started))
"""
BUSY = "while True: pass"  # a core kept busy, as a build or a browser tab would


@contextmanager
def background_load(n_busy: int):
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n_busy)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def one_run(engine: str, model: str, threads: int, timeout: float = 600) -> float:
    code = RUN.format(model=model, threads=threads, n=N_GEN, engine=engine, here=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise click.ClickException(f"{engine} run failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--runs", default=10, show_default=True, help="fresh processes per engine, load and thread count")
@click.option("--loads", default="0,1,2", show_default=True, help="busy background processes, comma-separated")
@click.option("--threads", "thread_counts", default="1,2", show_default=True)
@click.option("--engines", default="llamba,llama.cpp", show_default=True,
              help="and 'memory': a read-bandwidth probe (GB/s) in fresh processes, the machine's own spread")
def main(model, runs, loads, thread_counts, engines) -> None:
    engines = engines.split(",")
    rows = []
    for n_busy in map(int, loads.split(",")):
        with background_load(n_busy):
            for threads in map(int, thread_counts.split(",")):
                rates = {engine: [] for engine in engines}
                for run in range(runs):
                    for engine in engines:
                        rates[engine].append(one_run(engine, model, threads))
                        click.echo(f"busy {n_busy} threads {threads} {engine} run {run + 1}: "
                                   f"{rates[engine][-1]:.1f} tok/s", err=True)
                rows.append((n_busy, threads, rates))
    click.echo(f"\n{model}, tg{N_GEN}, {runs} fresh processes each: tokens per second (memory: GB/s) "
               "min / median / max")
    head = "| busy | threads | " + " | ".join(engines) + " |"
    # the own-median columns are each engine's spread over fresh processes; memory's is the machine's own
    compared = "llamba" in engines and "llama.cpp" in engines
    extra = " slowest llamba / median llama.cpp |" if compared else ""
    extra += "".join(f" slowest {engine} / own median |" for engine in engines)
    click.echo(head + extra)
    click.echo("| ---: | ---: |" + " ---: |" * (2 * len(engines) + compared))
    for n_busy, threads, rates in rows:
        cells = [f"{min(r):.1f} / {statistics.median(r):.1f} / {max(r):.1f}" for r in rates.values()]
        line = f"| {n_busy} | {threads} | " + " | ".join(cells) + " |"
        if compared:
            line += f" {min(rates['llamba']) / statistics.median(rates['llama.cpp']):.2f} |"
        line += "".join(f" {min(r) / statistics.median(r):.2f} |" for r in rates.values())
        click.echo(line)


if __name__ == "__main__":
    main()
