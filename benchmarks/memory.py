"""Resident memory while generating, against the budget: file size + KV cache in use + 150 MB (10^6 bytes).

    python benchmarks/memory.py [--model smollm2-135m] [--tokens 256]
"""

from __future__ import annotations

import argparse
import os


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    from llamba.api import Llama

    baseline = rss_bytes()  # Python, NumPy, Numba and llamba imported, nothing loaded
    llm = Llama(args.model)
    peak = 0
    for _ in llm.stream_tokens(llm.tokenize("Once upon a time"), max_tokens=args.tokens, temperature=0.8, seed=0):
        peak = max(peak, rss_bytes())
    file_bytes = os.path.getsize(llm.model_path)
    kv = llm.cache.nbytes_used
    budget = file_bytes + kv + 150 * 10**6
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print("| model | file | KV cache in use | RSS after imports | peak RSS | budget (file + KV + 150 MB) | within |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    print(f"| {llm.model_path.name} | {mib(file_bytes)} | {mib(kv)} | {mib(baseline)} | {mib(peak)} | {mib(budget)} "
          f"| {'yes' if peak <= budget else 'NO'} |")


if __name__ == "__main__":
    main()
