"""Making model files: Hugging Face checkpoints to GGUF (convert), GGUF to GGUF (quantize), GGUF back to a
Hugging Face checkpoint (export).

Beside the runtime rather than in its path: it may import formats/, models/ (each family's tensor names and
config keys), text/ (tokenizers) and errors, and never runs a model.
"""

from .gguf_to_hf import export
from .hf_to_gguf import convert
from .requantize import requantize
from .types import OUTPUT_TYPES

__all__ = ["convert", "export", "requantize", "OUTPUT_TYPES"]
