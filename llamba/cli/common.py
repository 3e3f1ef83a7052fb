"""Small helpers the commands share."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import LlambaError


def read_text_option(text: str | None, path: str | None) -> str:
    """The text from -p, or from -f FILE, or from standard input when neither is given (and it is piped)."""
    if text is not None and path is not None:
        raise LlambaError("give the text with -p or -f, not both")
    if text is not None:
        return text
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise LlambaError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise LlambaError(f"{path}: not UTF-8 text") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise LlambaError("no text: give -p TEXT, -f FILE, or pipe text to standard input")
    return sys.stdin.read()
