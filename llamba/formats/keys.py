"""Typed, range-checked reads of GGUF metadata values.

A file says what type each value has, and a hostile or broken one says anything: a string where a count
belongs, NaN for an epsilon, a head count of 0. Whatever sizes a loop or an array is read through here, and a
bad value fails with its key, its value and the rule it broke.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import GGUFError, UnsupportedError

REQUIRED = object()
DEFAULT_HIGH = 1 << 16


class MetadataKeys:
    """Reads the keys `prefix + key` of one file's metadata."""

    def __init__(self, metadata: dict, path: str, prefix: str = ""):
        self.metadata = metadata
        self.path = path
        self.prefix = prefix

    def fail(self, key: str, value: Any, why: str) -> GGUFError:
        shown = f"an array of {len(value)}" if isinstance(value, (np.ndarray, list)) else repr(value)[:80]
        return GGUFError(f"{self.path}: metadata {self.prefix}{key} = {shown} {why}")

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        value = self.metadata.get(self.prefix + key)
        if value is None:
            if default is REQUIRED:
                raise GGUFError(f"{self.path}: metadata key {self.prefix}{key} is missing")
            return default
        return value

    def count(self, key: str, default: Any = REQUIRED, low: int = 1, high: int = DEFAULT_HIGH) -> int:
        """A whole number in [low, high]; a per-layer array must hold one repeated value (all we support)."""
        value = self.raw(key, default)
        if isinstance(value, np.ndarray):
            if value.size == 0 or value.dtype.kind not in "iu":
                raise self.fail(key, value, "is not a count")
            if (value != value.flat[0]).any():
                raise UnsupportedError(f"{self.path}: per-layer {self.prefix}{key} values differ; not supported")
            value = value.flat[0].item()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self.fail(key, value, "is not a whole number")
        if not low <= value <= high:
            raise self.fail(key, value, f"is out of range (expected {low} to {high})")
        return int(value)

    def real(self, key: str, default: Any = REQUIRED, low: float = 0.0, high: float = math.inf,
             above_low: bool = False) -> float:
        """A finite number in [low, high] (or (low, high] when above_low)."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self.fail(key, value, "is not a number")
        value = float(value)
        if not math.isfinite(value) or value < low or value > high or (above_low and value == low):
            rule = f"must be finite and {'above' if above_low else 'at least'} {low}"
            raise self.fail(key, value, rule + (f", at most {high}" if high < math.inf else ""))
        return value

    def text(self, key: str, default: Any = REQUIRED) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.fail(key, value, "is not a string")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise self.fail(key, value, "is not a boolean")
        return bool(value)

    def token_id(self, key: str, n_tokens: int, default: int | None = None) -> int | None:
        """A token id within the vocabulary; None when absent (or -1, which some converters write). A default
        outside a small vocabulary is None too."""
        value = self.metadata.get(self.prefix + key)
        if value is None:
            return default if default is not None and 0 <= default < n_tokens else None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value == -1:
            return None
        return self.count(key, low=0, high=n_tokens - 1)

    def strings(self, key: str, default: Any = REQUIRED) -> list[str]:
        """A list of strings, of any length."""
        value = self.raw(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, value, "must be an array of strings")
        return value

    def numbers(self, key: str, n: int, whole: bool) -> np.ndarray | None:
        """An array of n numbers (whole ones if asked); None when absent."""
        value = self.raw(key, None)
        if value is None:
            return None
        kinds = "iu" if whole else "iuf"
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.size == n and value.dtype.kind in kinds):
            raise self.fail(key, value, f"must be an array of {n} {'whole numbers' if whole else 'numbers'}")
        return value
