"""Time from a fresh Python process to the first generated token (warm kernel caches), and the first-run
compile time with the Numba cache emptied.

    python benchmarks/startup.py [--model smollm2-135m] [--repeat 3] [--cold]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import time
started = time.perf_counter()
from llamba import Llama
llm = Llama({model!r})
llm.generate("Hello", max_tokens=1, temperature=0)
print(time.perf_counter() - started)
"""


def run_once(model: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(model=model)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time a first run with the kernel cache emptied")
    args = parser.parse_args()
    run_once(args.model)  # the page cache and the kernel cache warm
    warm = [run_once(args.model) for _ in range(args.repeat)]
    print("| measurement | seconds |")
    print("| --- | ---: |")
    print(f"| open {args.model} + first token, warm caches (median of {args.repeat}) | {statistics.median(warm):.2f} |")
    if args.cold:
        import llamba.ops

        cache_dir = Path(llamba.ops.__file__).parent / "__pycache__"
        for index in list(cache_dir.glob("*.nbi")) + list(cache_dir.glob("*.nbc")):
            index.unlink()
        print(f"| open + first token, cold kernel cache (compiles) | {run_once(args.model):.1f} |")


if __name__ == "__main__":
    main()
