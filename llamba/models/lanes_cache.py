"""Repacked weights kept on disk, so that opening a model again maps them instead of repacking.

Repacking is cheap arithmetic, but it writes every weight byte into fresh memory, and on a VM the first touch
of fresh memory is what costs: 0.03-0.6 s for Gemma's 256 MB, varying from run to run. Pages of a file the
kernel has cached cost nothing of the kind. So the first load of a model writes its weight arena to
`$LLAMBA_HOME/lanes/`, and later loads map that file (copy-on-write, never written) in place of repacking.

A cache file belongs to one model path (its name is a digest of the path; a new version of the model replaces
it) and is used only when its key matches: the model file's size and modification time, the arena's size, and
the source of the code that decides the layout. Anything else (a missing, short or foreign file, a read-only
cache directory) means repacking as if there were no cache; the model file itself is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..store import llamba_home

MAGIC = b"LLAMBA-LANES 1\n"
HEADER = 2 << 20  # bytes before the weights (a hole, mostly): 2 MB, so the page cache's large folios map
#                   as huge pages (the weights' arrays start on a 2 MB boundary of the file and of memory)
MIN_BYTES = 32 << 20  # smaller models repack in a blink: not worth a file (and tests make many tiny models)
LAYOUT_SOURCES = ("ops/repack.py", "models/transformer.py", "formats/quants.py")  # what decides the bytes


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMBA_LANES_DIR") or llamba_home() / "lanes")


def cache_file(model_path: str) -> Path:
    digest = hashlib.sha256(os.path.abspath(model_path).encode()).hexdigest()[:20]
    return cache_dir() / f"{digest}.lanes"


def load(model_path: str, nbytes: int) -> np.ndarray | None:
    """The model's arena as saved, mapped copy-on-write (writable, as the kernels' arrays always are), or None."""
    if nbytes < MIN_BYTES:
        return None
    try:
        with open(cache_file(model_path), "rb") as f:
            header = _read_header(f)
            if header != _header(model_path, nbytes) or os.fstat(f.fileno()).st_size != HEADER + nbytes:
                return None
            mapping = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_PRIVATE, offset=HEADER)
    except (OSError, ValueError, AttributeError):  # AttributeError: no MAP_PRIVATE (not POSIX)
        return None
    if hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)  # read ahead whatever is not in the page cache
    return np.frombuffer(mapping, np.uint8)


def save(model_path: str, arena: np.ndarray) -> None:
    """Write the arena for the next load (atomically: a reader sees the old file or the whole new one). A cache
    that cannot be written is no cache, never an error."""
    if arena.nbytes < MIN_BYTES:
        return
    target = cache_file(model_path)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        header = MAGIC + json.dumps(_header(model_path, arena.nbytes)).encode()
        with open(partial, "wb") as f:
            f.write(header)
            f.seek(HEADER)
            f.write(memoryview(arena))
        os.replace(partial, target)
    except OSError:
        with contextlib.suppress(OSError):  # (no directory to hold it: nothing to remove either)
            partial.unlink()
        return
    _remove_orphans(target.parent)


def _remove_orphans(folder: Path) -> None:
    """Delete the files of models that are gone, and writes abandoned over an hour ago."""
    for path in folder.glob("*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime > 3600:
                path.unlink()
    for path in folder.glob("*.lanes"):
        with contextlib.suppress(OSError, ValueError):
            with open(path, "rb") as f:
                header = _read_header(f)
            if not os.path.exists(str((header or {}).get("model", ""))):
                path.unlink()


def _header(model_path: str, nbytes: int) -> dict:
    stat = os.stat(model_path)
    return {"model": os.path.abspath(model_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "nbytes": nbytes, "layout": _layout_digest()}


def _read_header(f) -> dict | None:
    """The header's fields; None for a file that is not ours (ValueError for one that is garbled)."""
    raw = f.read(4096)
    if not raw.startswith(MAGIC):
        return None
    header = json.loads(raw[len(MAGIC) :].rstrip(b"\0"))
    return header if isinstance(header, dict) else None


@lru_cache(maxsize=1)
def _layout_digest() -> str:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for source in LAYOUT_SOURCES:
        digest.update((package / source).read_bytes())
    return digest.hexdigest()
