"""Models: the architecture registry (GGUF `general.architecture` -> module with `hparams(gguf) -> HParams`),
the shared transformer (`forward(batch, cache) -> logits`), one module per family, and the repacked-weights cache.

It may import ops/ (kernels), memory/ (Batch, the cache's per-layer view), formats/ and errors; it knows no
sampling, text or serving.
"""

from __future__ import annotations

import os
from types import ModuleType

from ..errors import GGUFError, UnsupportedError
from ..formats.gguf import GGUFFile, open_gguf
from . import deepseek2, gemma3, llama, olmoe, phi3, qwen2, qwen2moe, qwen3, qwen3moe
from .transformer import HParams, Transformer

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "qwen2moe": qwen2moe,
    "qwen3moe": qwen3moe,
    "olmoe": olmoe,
    "phi3": phi3,
    "deepseek2": deepseek2,
    "gemma3": gemma3,
}


def hf_spec(model_class: str, where: str = "config.json"):
    """The HFSpec of a Hugging Face `architectures` class name."""
    for spec in _hf_specs():
        if model_class in spec.classes:
            return spec
    supported = ", ".join(c for spec in _hf_specs() for c in spec.classes)
    raise UnsupportedError(f"{where}: architecture {model_class!r} is not supported (supported: {supported})")


def _hf_specs():
    """Every module's Hugging Face specs (llama's two: dense, and Mixtral)."""
    for module in dict.fromkeys(ARCHITECTURES.values()):
        yield from getattr(module, "HF_SPECS", (module.HF,))


def architecture_module(arch, path: str = "") -> ModuleType:
    if arch is not None and not isinstance(arch, str):
        raise GGUFError(f"{path}: metadata general.architecture is not a string")
    module = ARCHITECTURES.get(arch or "")
    if module is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")
    return module


def export_spec(g: GGUFFile):
    """The HFSpec a GGUF file exports through: its architecture's, the one with experts if it has them
    (a llama file with ffn_*_exps is Mixtral)."""
    has_experts = any(len(t.shape) == 3 for t in g.tensors.values())
    module = architecture_module(g.architecture, g.path)
    specs = getattr(module, "HF_SPECS", (module.HF,))
    return next((spec for spec in specs if bool(spec.experts) == has_experts), specs[0])


def read_hparams(source: str | os.PathLike | GGUFFile) -> HParams:
    """A model's hyperparameters from its metadata alone (nothing is repacked)."""
    g = source if isinstance(source, GGUFFile) else open_gguf(source)
    return architecture_module(g.architecture, g.path).hparams(g)


def load_transformer(source: str | os.PathLike | GGUFFile) -> Transformer:
    """Open a GGUF file (or take an open one) and build its transformer, weights repacked for the kernels."""
    g = source if isinstance(source, GGUFFile) else open_gguf(source)
    return Transformer(g, read_hparams(g))


__all__ = ["ARCHITECTURES", "HParams", "Transformer", "load_transformer", "read_hparams", "architecture_module", "hf_spec",
           "export_spec"]
