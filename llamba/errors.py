"""The one error family users see: every error a user can cause raises a subclass of LlambaError.

The subclasses say what kind of error it is, so a caller that must tell them apart (the server, mapping each to
an HTTP status) tests the type, never the message. Owns no imports: every room may import it.
"""


class LlambaError(Exception):
    """An error caused by input (a path, a file, a value): the CLI prints its message on one line and exits 1."""


class BadRequestError(LlambaError):
    """A value outside what is accepted (a sampling option, a decoder's name, an empty prompt)."""


class ContextOverflowError(LlambaError):
    """More tokens than the context holds (a prompt, a conversation, a saved session)."""


class NotFoundError(LlambaError):
    """Something named that is not there (a model, a file, a chat template)."""


class OverloadError(LlambaError):
    """Every slot is busy and the queue is full: try again later."""


class GGUFError(LlambaError):
    """A GGUF file that cannot be read: the message says what and where (byte offset, key or tensor)."""


class UnsupportedError(LlambaError):
    """Something well-formed that llamba does not handle (a type, an architecture, a tokenizer model)."""


class NumericalError(LlambaError):
    """The model produced NaN or inf (broken weights or hyperparameters): the message names where it started."""
