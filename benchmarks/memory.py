"""Resident memory while generating, against the budget: file size + KV cache + 150 MB (10^6 bytes).

The KV cache is counted two ways: as allocated for the context (what llama.cpp holds resident: it writes the
whole cache), and, stricter, only the positions in use (llamba never touches the rest, so it is not resident).

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
    allowance = 150 * 10**6
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(f"{llm.model_path.name}: file {mib(file_bytes)}, context {llm.n_ctx}, RSS after imports {mib(baseline)}, "
          f"peak RSS while generating {args.tokens} tokens {mib(peak)}")
    print("| KV cache counted | KV cache | budget (file + KV + 150 MB) | peak RSS | within |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, kv in (("as allocated", llm.cache.nbytes), ("in use", llm.cache.nbytes_used)):
        budget = file_bytes + kv + allowance
        print(f"| {label} | {mib(kv)} | {mib(budget)} | {mib(peak)} | {'yes' if peak <= budget else 'NO'} |")


if __name__ == "__main__":
    main()
