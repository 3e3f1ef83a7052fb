"""Tokenizer speed on one core: gpl-3.txt (35 KB) and 1 MB of mixed text, for both test models.

    python benchmarks/tokenize_speed.py
"""

from __future__ import annotations

import time
from pathlib import Path

from llamba.formats.gguf import open_gguf
from llamba.text.tokenizer import Tokenizer
from llamba.store import KNOWN_MODELS, resolve_model

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference_data"


def mixed_text(n_bytes: int) -> str:
    """Prose, code, numbers, CJK, emoji and whitespace runs, repeated with variation up to n_bytes."""
    base = (REFERENCE / "gpl-3.txt").read_text(encoding="utf-8")
    corpus = (REFERENCE / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    parts, size, i = [], 0, 0
    while size < n_bytes:
        piece = f"{base[i % 5000 : i % 5000 + 3000]}\n{corpus}\n    def f{i}(x):\n\treturn x * {i} + 0x{i:x}  # 数字 {i} 🎉\n"
        parts.append(piece)
        size += len(piece.encode("utf-8"))
        i += 1
    return "".join(parts)


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    gpl = (REFERENCE / "gpl-3.txt").read_text(encoding="utf-8")
    big = mixed_text(1 << 20)
    print("| model | gpl-3.txt (35 KB) s | tokens | 1 MB mixed s | tokens |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in KNOWN_MODELS:
        g = open_gguf(resolve_model(name))
        # a fresh tokenizer each time: no warm word cache from an earlier run
        small_s = best_of(lambda: Tokenizer(g.metadata).encode(gpl))
        big_s = best_of(lambda: Tokenizer(g.metadata).encode(big), repeat=1)
        tok = Tokenizer(g.metadata)
        print(f"| {name} | {small_s:.3f} | {len(tok.encode(gpl))} | {big_s:.2f} | {len(tok.encode(big))} |")


if __name__ == "__main__":
    main()
