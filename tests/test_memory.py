"""What stays resident once a model is loaded: the repacked weights, not the file's pages nor LLVM's code."""

import re

import pytest

from llamba.api import Llama

MiB = 2**20


def resident_bytes(path_part: str) -> int:
    """RSS of this process's mappings whose path contains path_part."""
    total, matching = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                matching = path_part in line
            elif matching and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Llama(smollm2_path, n_ctx=256)


def test_generating_leaves_the_file_and_the_compiler_paged_out(llm, smollm2_path):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # long enough for the prefill path
    text = llm.generate(prompt, max_tokens=8, temperature=0)
    assert text  # the kernels still run after the compiler's pages went
    # before: every norm weight was a view into the mmap (4 MiB of this file, 49 MiB of Gemma's faulted back), LLVM's
    # 68 MiB of code stayed resident
    assert resident_bytes(smollm2_path.name) < 1 * MiB
    assert resident_bytes("libllvmlite") < 8 * MiB
