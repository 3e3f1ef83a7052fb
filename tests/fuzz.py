"""A fuzz harness: seeded mutants of valid GGUF models, each loaded, run and generated from in a child process
under a time and memory cap, every outcome classified.

    python -m tests.fuzz --cases 10000 [--seed 0] [--real PATH] [--jobs 2]

Seeds: tiny llama (BPE vocabulary) and gemma3 (SentencePiece) models with chat templates, and optionally a
real file's metadata with zero weights (`--real`, a sparse file: cheap to write). A case applies one to three
mutations: a metadata value replaced (zero, negative, huge, NaN, infinite, wrong type, random text), a key
removed or added, a tensor dropped, reshaped or filled with NaN/inf, header bytes flipped, the file truncated.

Outcomes: `ran` (loaded and generated, logits finite), `error` (a LlambaError: a clean one-line error), and
the failures: `exception` (any other exception), `crash` (the child died: a signal), `hang` (past the time
cap), `silent-nan` (non-finite logits without an error). The run fails when any failure occurs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

FAILURES = ("exception", "crash", "hang", "silent-nan")
TIME_CAP = 60.0  # seconds per case (a tiny case takes milliseconds; a real-file one about a second)
MEMORY_CAP = 8 << 30  # bytes of address space per child
VT = gguf.GGUFValueType


# ----------------------------------------------------------------------------------------------- specs

@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order (row length first)
    type: gguf.GGMLQuantizationType
    data: bytes | None  # None: zeros (a sparse region)


@dataclass
class Spec:
    """A GGUF file as metadata and tensors, mutated before being written."""

    kv: dict[str, tuple[object, VT, VT | None]]  # key -> (value, type, array item type)
    tensors: list[Tensor]
    damage: list[tuple[str, int, int]] = field(default_factory=list)  # byte edits after writing

    def write(self, path: Path) -> None:
        w = gguf.GGUFWriter(str(path), arch="llama")
        w.kv_data[0].clear()  # the writer adds general.architecture itself; the spec decides
        for key, (value, vtype, sub) in self.kv.items():
            w.add_key_value(key, value, vtype, sub)
        for t in self.tensors:
            numpy_shape = tuple(reversed(t.shape))
            n_bytes = _n_bytes(t)
            if t.type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor_info(t.name, numpy_shape, np.dtype(np.float32 if t.type.name == "F32" else np.float16), n_bytes)
            else:
                w.add_tensor_info(t.name, numpy_shape, np.dtype(np.float32), n_bytes, raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        with open(path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            at = _pad(f.tell())
            for t in self.tensors:
                if t.data is not None:
                    f.seek(at)
                    f.write(t.data)
                at = _pad(at + _n_bytes(t))
            f.truncate(at)  # regions not written stay zero (sparse)
            size = at
            for kind, where, value in self.damage:
                if kind == "truncate":
                    f.truncate(where % size)
                    size = where % size
                elif size:
                    f.seek(where % min(size, 1 << 16))
                    f.write(bytes([value]))


def _n_bytes(t: Tensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t.type]
    n = 1
    for d in t.shape:
        n *= d
    return n // block * size


def _pad(n: int, alignment: int = 32) -> int:
    return (n + alignment - 1) // alignment * alignment


def spec_of(path: Path, keep_data: bool) -> Spec:
    """A file as a spec (with llamba's reader, which keeps every value's GGUF type)."""
    from llamba.formats.gguf import open_gguf

    g = open_gguf(path)
    kv = {}
    for key, value in g.metadata.items():
        vtype = VT(g.value_types[key])
        sub = None
        if vtype == VT.ARRAY:
            if isinstance(value, list):
                sub = VT.STRING
            else:
                sub = _ARRAY_TYPES[np.dtype(value.dtype).str]
                value = value.tolist()
        kv[key] = (value, vtype, sub)
    tensors = [Tensor(t.name, tuple(t.shape), gguf.GGMLQuantizationType(t.type.id),
                      bytes(np.asarray(t.data).view(np.uint8).reshape(-1)) if keep_data else None)
               for t in g.tensors.values()]
    return Spec(kv, tensors)


_ARRAY_TYPES = {"<i4": VT.INT32, "<u4": VT.UINT32, "<f4": VT.FLOAT32, "|i1": VT.INT8, "|u1": VT.UINT8,
                "<i8": VT.INT64, "<u8": VT.UINT64, "<f8": VT.FLOAT64, "<i2": VT.INT16, "<u2": VT.UINT16,
                "|b1": VT.BOOL}


# ----------------------------------------------------------------------------------------------- mutations

def _odd_value(rng: random.Random, old):
    """A replacement value: the usual suspects for a count, a float, a string or an array."""
    choices = [0, -1, 1, 2, 3, 7, 1000, 2**31 - 1, 2**32 - 1, 2**63 - 1, -(2**31), float("nan"), float("inf"),
               -float("inf"), 0.0, -0.5, 1e30, 1e-30, True, False, "", "x" * rng.randint(1, 40), "gpt2", "llama",
               "\u2581", [], [0], [1, 2, 3], ["a", "b"], [float("nan")] * 4]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        choices += [old * 2, old // 2 if isinstance(old, int) else old / 2, old + 1, old - 1, -old]
    if isinstance(old, list) and old:
        choices += [old[: len(old) // 2], old + old[:3], list(reversed(old)), [old[0]] * len(old)]
    return rng.choice(choices)


def _typed(value, rng: random.Random) -> tuple[object, VT, VT | None]:
    """(value, type, item type) the writer can pack for a Python value."""
    if isinstance(value, bool):
        return value, VT.BOOL, None
    if isinstance(value, int):
        if value < 0:
            return value, rng.choice([VT.INT32, VT.INT64]) if value >= -(2**31) else VT.INT64, None
        if value < 2**32:
            return value, rng.choice([VT.UINT32, VT.INT32 if value < 2**31 else VT.UINT64, VT.UINT64]), None
        return value, VT.UINT64, None
    if isinstance(value, float):
        return value, rng.choice([VT.FLOAT32, VT.FLOAT64]), None
    if isinstance(value, str):
        return value, VT.STRING, None
    if not value:
        return [0], VT.ARRAY, VT.INT32
    first = value[0]
    sub = VT.STRING if isinstance(first, str) else VT.FLOAT32 if isinstance(first, float) else VT.INT32
    if sub == VT.INT32 and any(not isinstance(v, int) or not -(2**31) <= v < 2**31 for v in value):
        sub = VT.FLOAT32 if all(isinstance(v, (int, float)) for v in value) else VT.STRING
        value = [float(v) if sub == VT.FLOAT32 else str(v) for v in value]
    return value, VT.ARRAY, sub


def mutate(spec: Spec, rng: random.Random) -> list[str]:
    """Apply one to three mutations; returns what was done (for the report)."""
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        kind = rng.choices(["value", "drop-key", "add-key", "tensor", "bytes", "truncate"], [50, 8, 8, 22, 8, 4])[0]
        done.append(MUTATIONS[kind](spec, rng))
    return done


def _mutate_value(spec: Spec, rng: random.Random) -> str:
    key = rng.choice(list(spec.kv))
    spec.kv[key] = _typed(_odd_value(rng, spec.kv[key][0]), rng)
    return f"{key}={spec.kv[key][0]!r:.40}"


def _drop_key(spec: Spec, rng: random.Random) -> str:
    key = rng.choice(list(spec.kv))
    del spec.kv[key]
    return f"-{key}"


ADDABLE = ["attention.key_length", "attention.value_length", "rope.dimension_count", "rope.scaling.type",
           "rope.scaling.factor", "rope.freq_scale", "attention.sliding_window", "final_logit_softcapping",
           "vocab_size", "attention.head_count_kv", "rope.scaling.original_context_length"]


def _add_key(spec: Spec, rng: random.Random) -> str:
    arch = spec.kv.get("general.architecture", ("llama",))[0]
    key = rng.choice([f"{arch}.{k}" for k in ADDABLE] + ["tokenizer.ggml.eot_token_id", "tokenizer.chat_template",
                                                         "general.alignment", "tokenizer.ggml.add_bos_token"])
    spec.kv[key] = _typed(_odd_value(rng, 64), rng)
    return f"+{key}={spec.kv[key][0]!r:.40}"


def _mutate_tensor(spec: Spec, rng: random.Random) -> str:
    i = rng.randrange(len(spec.tensors))
    t = spec.tensors[i]
    how = rng.choice(["drop", "rows", "cols", "swap", "poison", "type"])
    if how == "drop":
        del spec.tensors[i]
    elif how == "rows" and len(t.shape) > 1:
        t.shape = (t.shape[0], max(1, t.shape[1] + rng.choice([-1, 1, t.shape[1]])), *t.shape[2:])
        t.data = None
    elif how == "cols":
        block = gguf.GGML_QUANT_SIZES[t.type][0]
        t.shape = (max(block, t.shape[0] + rng.choice([-block, block])), *t.shape[1:])
        t.data = None
    elif how == "swap" and len(t.shape) > 1:
        t.shape = (t.shape[1], t.shape[0], *t.shape[2:])
        t.data = None
    elif how == "type":
        t.type = rng.choice([gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K,
                             gguf.GGMLQuantizationType.IQ2_XXS, gguf.GGMLQuantizationType.I32])
        t.data = None
    elif t.data is not None:  # poison: NaN / inf bit patterns written over the data
        data = bytearray(t.data)
        pattern = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff"])
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(max(1, len(data) - len(pattern)))
            data[at : at + len(pattern)] = pattern
        t.data = bytes(data)
    return f"tensor {t.name}: {how}"


def _flip_bytes(spec: Spec, rng: random.Random) -> str:
    edits = [("byte", rng.randrange(1 << 16), rng.randrange(256)) for _ in range(rng.randint(1, 4))]
    spec.damage += edits
    return f"bytes {[e[1] for e in edits]}"


def _truncate(spec: Spec, rng: random.Random) -> str:
    spec.damage.append(("truncate", rng.randrange(1 << 30), 0))
    return "truncate"


MUTATIONS = {"value": _mutate_value, "drop-key": _drop_key, "add-key": _add_key, "tensor": _mutate_tensor,
             "bytes": _flip_bytes, "truncate": _truncate}


# ----------------------------------------------------------------------------------------------- the child

def run_case(path: str) -> dict:
    """Load, chat-format, evaluate and generate (two decoders); classify what happened."""
    from llamba import Llama
    from llamba.errors import LlambaError

    try:
        llm = Llama(path, n_ctx=64, n_threads=1)
        ids = llm.chat_prompt_ids([{"role": "user", "content": "hello world"}])[-32:]
        logits = llm.logits(ids)
        if not np.isfinite(logits).all():
            return {"outcome": "silent-nan", "detail": "non-finite logits without an error"}
        text = "".join(s.text for s in llm.stream_tokens(ids, max_tokens=4, temperature=0))
        text += "".join(s.text for s in llm.stream_tokens(ids, max_tokens=4, temperature=0, decoding="prompt-lookup"))
        llm.detokenize(list(range(min(len(llm.tokenizer.tokens), 300))))
        return {"outcome": "ran", "detail": f"{len(text)} characters"}
    except LlambaError as e:
        return {"outcome": "error", "detail": str(e)[:300]}
    except Exception as e:  # noqa: BLE001 - classifying is the point
        return {"outcome": "exception", "detail": f"{type(e).__name__}: {str(e)[:300]}"}


def child_main(warm_up: str) -> None:
    """Run the valid seed once (compiling the kernels if this machine has not yet), say so, then read case
    paths from stdin and answer one JSON line each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    logging.disable(logging.WARNING)
    print(json.dumps(run_case(warm_up)), flush=True)
    for line in sys.stdin:
        result = run_case(line.strip())
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Child:
    """One worker process; restarted after a crash or a hang. It is ready once it has run a valid model (the
    first start on a fresh machine compiles the kernels: that time is not a case's)."""

    READY_CAP = 900.0

    def __init__(self, warm_up: Path):
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--child", str(warm_up)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.READY_CAP)
        first = json.loads(self.proc.stdout.readline() or "{}") if ready else {}
        if first.get("outcome") != "ran":
            self.kill()
            raise RuntimeError(f"the fuzz child could not run the valid seed model: {first or 'no answer'}")

    def run(self, path: Path, cap: float) -> dict:
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], cap)
        if not ready:
            self.kill()
            return {"outcome": "hang", "detail": f"no answer within {cap:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"outcome": "crash", "detail": f"child exited with {code}"}
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------- the parent

def seed_specs(folder: Path, real: Path | None) -> list[tuple[str, Spec]]:
    from tests.tiny_models import write_tiny_model

    seeds = []
    for arch, vocab in (("llama", "bpe"), ("gemma3", "spm")):
        path = write_tiny_model(folder / f"seed-{arch}.gguf", arch, vocab=vocab)
        seeds.append((f"tiny-{arch}", spec_of(path, keep_data=True)))
    if real is not None:
        seeds.append((f"real-{real.name}", spec_of(real, keep_data=False)))
    return seeds


def fuzz(n_cases: int, seed: int = 0, real: Path | None = None, real_share: float = 0.05,
         jobs: int = 1, log=print) -> dict:
    """Run n_cases (case i on worker i mod jobs); returns {"counts": outcome -> n, "failures": [(case, seed
    name, mutations, detail)], "seconds"}."""
    logging.getLogger("gguf").setLevel(logging.ERROR)
    counts: Counter = Counter()
    failures = []
    lock = threading.Lock()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llamba-fuzz-") as tmp:
        folder = Path(tmp)
        seeds = seed_specs(folder, real)
        warm_up = folder / "seed-llama.gguf"

        def worker(slot: int) -> None:
            child = Child(warm_up)
            try:
                for case in range(slot, n_cases, jobs):
                    name, what, path = _write_case(case, seed, seeds, real_share, folder / f"case-{slot}.gguf")
                    if not child.alive():
                        child = Child(warm_up)
                    result = child.run(path, TIME_CAP)
                    if result["outcome"] in ("hang", "crash"):
                        child = Child(warm_up)
                    with lock:
                        counts[result["outcome"]] += 1
                        if result["outcome"] in FAILURES:
                            failures.append((case, name, what, result["detail"]))
                            log(f"case {case} ({name}: {'; '.join(what)}): {result['outcome']}: {result['detail']}")
                        done = sum(counts.values())
                        if done % 500 == 0:
                            log(f"{done} cases, {time.monotonic() - started:.0f} s: {dict(counts)}")
            finally:
                child.kill()

        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(max(1, jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"counts": dict(counts), "failures": sorted(failures), "seconds": time.monotonic() - started}


def _write_case(case: int, seed: int, seeds: list[tuple[str, Spec]], real_share: float, path: Path):
    """Case number `case`: a seed chosen and mutated by a generator seeded with the case number alone, so any
    case can be replayed."""
    rng = random.Random(seed * 1_000_003 + case)
    tiny = [s for s in seeds if s[0].startswith("tiny")]
    real = [s for s in seeds if not s[0].startswith("tiny")]
    name, base = rng.choice(real) if real and rng.random() < real_share else rng.choice(tiny)
    spec = Spec(dict(base.kv), [Tensor(t.name, t.shape, t.type, t.data) for t in base.tensors])
    what = mutate(spec, rng)
    try:
        spec.write(path)
    except (ValueError, TypeError, OverflowError, struct.error):  # a value the writer cannot pack
        what.append("(unwritable, so the seed itself)")
        base.write(path)
    return name, what, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=Path, default=None, help="a real GGUF whose metadata is mutated too")
    parser.add_argument("--real-share", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--child", metavar="WARM_UP", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    report = fuzz(args.cases, args.seed, args.real, args.real_share, args.jobs)
    print(f"{args.cases} cases in {report['seconds']:.0f} s")
    for outcome in ("ran", "error", *FAILURES):
        print(f"  {outcome:<11} {report['counts'].get(outcome, 0)}")
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
