"""When the kernels are compiled, decided in one place.

Numba compiles a kernel at its first call and caches the machine code on disk (`cache=True`, ops/jit.py), so
only a machine's first run compiles. That run compiles in a child process (`ensure_compiled`): code Numba has
just compiled is not always the code it caches (the fast-math attention kernel's last bits differ), and a
process that compiled gave other answers than every later one. Every process then runs each kernel once on a
scratch cache at load (`warm_up`), so the cached code is loaded before the first request, and releases the
compiler's pages, which nothing later needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .ops.jit import kernels_compiled, release_compiler_pages
from .ops.matmul import SMALL_BATCH

COMPILING_CHILD = "LLAMBA_COMPILING_KERNELS"  # set in the child: it compiles, it does not start another
CHILD_CTX = 8  # the child's context: it only runs the warm-up


def ensure_compiled(path: Path, kv_type: str) -> None:
    """First run: load the model in a child process, which compiles the kernels into Numba's cache, so that this
    process loads them from the cache like every later run. Should the child fail, this process compiles them
    itself."""
    if kernels_compiled() or os.environ.get(COMPILING_CHILD):
        return
    code = f"from llamba import Llama; Llama({str(path)!r}, n_ctx={CHILD_CTX}, kv_type={kv_type!r})"
    try:
        subprocess.run([sys.executable, "-c", code], env={**os.environ, COMPILING_CHILD: "1"}, capture_output=True)
    except OSError:  # no Python to start (an embedded interpreter): compile here
        pass


def warm_up(model, kv_type: str) -> None:
    """Run the kernels once on a scratch cache (the prefill path and the batch path), so loading or compiling
    them happens now, then release the compiler's pages."""
    scratch = model.new_cache(SMALL_BATCH + 8, kv_type)
    later_layers = frozenset(range(1, model.hp.n_layer))  # every layer runs the same kernels
    model.forward_tokens([0] * (SMALL_BATCH + 1), 0, scratch, skip=later_layers)
    model.forward_tokens([0], SMALL_BATCH + 1, scratch)
    model.threads.reset()  # those timings included compiling
    release_compiler_pages()


__all__ = ["ensure_compiled", "kernels_compiled", "warm_up"]
