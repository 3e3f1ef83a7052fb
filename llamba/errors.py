"""The one exception type users see: every error a user can cause raises a subclass of LlambaError."""


class LlambaError(Exception):
    """An error caused by input (a path, a file, a value): the CLI prints its message on one line and exits 1."""


class GGUFError(LlambaError):
    """A GGUF file that cannot be read: the message says what and where (byte offset, key or tensor)."""


class UnsupportedError(LlambaError):
    """Something well-formed that llamba does not handle (a type, an architecture, a tokenizer model)."""


class NumericalError(LlambaError):
    """The model produced NaN or inf (broken weights or hyperparameters): the message names where it started."""
