"""Time to open each test model: llamba's GGUF reader against the `gguf` package's GGUFReader, in one run.

    python benchmarks/open_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gguf import GGUFReader

from llamba.formats.gguf import open_gguf
from llamba.store import KNOWN_MODELS, resolve_model


def _best_of(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| model | llamba open (s, best / median) | GGUFReader open (s, best / median) | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name in KNOWN_MODELS:
        path = resolve_model(name)
        ours = _best_of(lambda: open_gguf(path), args.repeat)
        theirs = _best_of(lambda: GGUFReader(path), args.repeat)
        print(f"| {name} | {ours[0]:.3f} / {ours[1]:.3f} | {theirs[0]:.2f} / {theirs[1]:.2f} | {theirs[0] / ours[0]:.0f}x |")


if __name__ == "__main__":
    main()
