"""llamba: a llama.cpp-style LLM runtime in Python (NumPy data, Numba kernels, GGUF models, CPU only)."""

from .errors import LlambaError

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing Llama pulls in Numba; keep `import llamba` (and the CLI's start-up) light until it is used.
    if name == "Llama":
        from .api import Llama

        return Llama
    raise AttributeError(name)


__all__ = ["Llama", "LlambaError", "__version__"]
