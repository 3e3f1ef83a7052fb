"""llama.cpp's logits on the seeded mixture-of-experts checkpoints (tests/moe_reference.py), through
llama-cpp-python, for tests/test_moe_llama_cpp.py:

    python benchmarks/make_moe_reference.py

For each case: its checkpoint is written and converted by `llamba convert`, llama.cpp evaluates the case's
token sequence with logits at every position, and tests/reference_data/moe/NAME.npz keeps `tokens`,
`logits` [n_tokens, n_vocab] float32 and `sha256` (of the GGUF, which the test rebuilds and checks).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.moe_reference import CASES, REFERENCE, build, sha256, tokens  # noqa: E402


def llama_cpp_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main() -> None:
    REFERENCE.mkdir(parents=True, exist_ok=True)
    print(f"{'case':<16} {'n_vocab':>7} {'sha256':<16}")
    for name, (_, _, seed, _) in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            path = build(name, Path(folder))
            from llamba.formats.gguf import open_gguf

            n_vocab = len(open_gguf(path).get("tokenizer.ggml.tokens"))
            ids = tokens(n_vocab, seed)
            logits = llama_cpp_logits(path, ids)
            digest = sha256(path)
        np.savez_compressed(REFERENCE / f"{name}.npz", tokens=ids, logits=logits, sha256=np.array(digest))
        print(f"{name:<16} {n_vocab:>7} {digest[:16]}")


if __name__ == "__main__":
    main()
