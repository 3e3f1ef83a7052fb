"""The first run, which compiles the kernels, computes exactly what every later run computes from the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import llamba

LOGITS = """
import sys, numpy as np
from llamba import Llama
llm = Llama(sys.argv[1], n_ctx=256)
ids = llm.chat_prompt_ids([{"role": "user", "content": "What are three good habits for staying healthy while "
                             "working at a desk? Explain each briefly."}])
np.save(sys.argv[2], llm.logits(ids, all_positions=True))
"""


def test_the_compiling_run_computes_like_every_later_one(tmp_path, smollm2_path):
    """A copy of the package with an empty kernel cache: the first process compiles (through its child), the
    second loads the cache. Numba's freshly compiled attention once differed from its cached code in the last
    bits (6e-8 here), which changed this prompt's logits and, later, its greedy answer."""
    package = Path(llamba.__file__).parent
    shutil.copytree(package, tmp_path / "llamba", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for run in ("compiling", "cached"):
        subprocess.run([sys.executable, "-c", LOGITS, str(smollm2_path), str(tmp_path / f"{run}.npy")],
                       env=env, check=True, cwd=tmp_path)
    assert (tmp_path / "llamba" / "ops" / "__pycache__").is_dir()  # the kernels were cached by the first run
    assert np.array_equal(np.load(tmp_path / "compiling.npy"), np.load(tmp_path / "cached.npy"))
