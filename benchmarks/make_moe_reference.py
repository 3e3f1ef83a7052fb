"""llama.cpp's logits on the seeded mixture-of-experts checkpoints (tests/moe_reference.py), through
llama-cpp-python, for tests/test_moe_llama_cpp.py:

    python benchmarks/make_moe_reference.py [CASE ...]     (every case, or the ones named)

For each case: its checkpoint is written and converted by `llamba convert`, llama.cpp evaluates the case's
token sequence with logits at every position, and tests/reference_data/moe/NAME.npz keeps `tokens`,
`logits` [n_tokens, n_vocab] float32 and `sha256` (of the GGUF, which the test rebuilds and checks).
Then each F32 case's file goes through llama-quantize's Q4_K_M (llama_model_quantize) and
q4_k_m_types.json keeps the type it chose for every tensor, which llamba's q4_k_m preset must choose too.
"""

from __future__ import annotations

import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamba.formats.gguf import open_gguf  # noqa: E402
from tests.moe_reference import CASES, QUANTIZE_TYPES, QUANTIZED_CASES, REFERENCE, build, sha256, tokens  # noqa: E402


def llama_cpp_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_quantize_types(path: Path, out: Path) -> dict[str, str]:
    """The type llama-quantize's Q4_K_M gives each tensor of the GGUF at path."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(path).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama-quantize failed on {path}")
    return {name: t.type.name for name, t in open_gguf(out).tensors.items()}


def make_logits(names: list[str]) -> None:
    print(f"{'case':<20} {'n_vocab':>7} {'sha256':<16}")
    for name in names:
        seed = CASES[name][2]
        with tempfile.TemporaryDirectory() as folder:
            path = build(name, Path(folder))
            n_vocab = len(open_gguf(path).get("tokenizer.ggml.tokens"))
            ids = tokens(n_vocab, seed)
            logits = llama_cpp_logits(path, ids)
            digest = sha256(path)
        np.savez_compressed(REFERENCE / f"{name}.npz", tokens=ids, logits=logits, sha256=np.array(digest))
        print(f"{name:<20} {n_vocab:>7} {digest[:16]}")


def make_quantize_types() -> None:
    types = {}
    for name in QUANTIZED_CASES:
        with tempfile.TemporaryDirectory() as folder:
            types[name] = llama_quantize_types(build(name, Path(folder)), Path(folder) / "q4_k_m.gguf")
        counts = {t: list(types[name].values()).count(t) for t in sorted(set(types[name].values()))}
        print(f"{name:<20} Q4_K_M: {counts}")
    QUANTIZE_TYPES.write_text(json.dumps(types, indent=1, sort_keys=True) + "\n")


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown} (the cases: {', '.join(CASES)})")
    REFERENCE.mkdir(parents=True, exist_ok=True)
    make_logits(names)
    make_quantize_types()


if __name__ == "__main__":
    main()
