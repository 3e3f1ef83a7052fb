"""What stays resident once a model is loaded: the repacked weights, not the file's pages nor LLVM's code."""

import mmap
import re
from pathlib import Path

import pytest

from llamba.api import Llama

MiB = 2**20


def resident_bytes(path_part: str, fields: tuple[str, ...] = ("Rss:",)) -> int:
    """RSS of this process's mappings whose path contains path_part (or the sum of other smaps fields)."""
    total, matching = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                matching = path_part in line
            elif matching and line.startswith(fields):
                total += int(line.split()[1]) * 1024
    return total


def one_touch_bytes(path: Path) -> int:
    """What touching one byte of path maps into this process: the page cache's granularity for this file (a
    4 KiB page, fault-around's 64 KiB, or one large folio of up to 2 MiB), measured on a fresh mapping."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        before = resident_bytes(path.name)
        view[len(view) // 2]  # in the middle of the weights
        return resident_bytes(path.name) - before


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return Llama(smollm2_path, n_ctx=256)


def test_generating_leaves_the_file_and_the_compiler_paged_out(llm, smollm2_path):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # long enough for the prefill path
    text = llm.generate(prompt, max_tokens=8, temperature=0)
    assert text  # the kernels still run after the compiler's pages went
    # before: every norm weight was a view into the mmap (4 MiB of this file, 49 MiB of Gemma's faulted back), LLVM's
    # 68 MiB of code stayed resident
    resident = resident_bytes(smollm2_path.name)
    # the header and metadata may stay mapped: at most two touches' worth, whatever the kernel maps per touch
    # (a fresh clone's page cache mapped 2 MiB folios); the norm weights' views were spread over all 30 layers
    assert resident <= max(1 * MiB, 2 * one_touch_bytes(smollm2_path)), resident
    # pages another process maps too (llamba or numba running beside the tests) are not ours to page out:
    # MADV_PAGEOUT skips them, so only the pages this process alone maps are counted
    assert resident_bytes("libllvmlite", ("Private_Clean:", "Private_Dirty:")) < 8 * MiB
