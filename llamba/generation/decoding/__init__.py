"""Decoders that guess ahead: `--decoding greedy|prompt-lookup|lookahead|draft:MODEL|self-spec|auto`.

Every decoder is a drafter run by one token loop (`speculative.decode_tokens`); `greedy` is that loop with no
drafter (plain decoding, whatever the temperature). See each module for how its guesses are made.
"""

from __future__ import annotations

from ...errors import BadRequestError, LlambaError
from .auto import AutoDrafter
from .prompt_lookup import PromptLookup
from .speculative import Controller, Speculation, SpeculationStats, decode_tokens

DECODERS = ("greedy", "prompt-lookup", "lookahead", "draft:MODEL", "self-spec", "auto")
# auto: prompt lookup with its guess count chosen step by step. In benchmarks/speculative.py (both test models,
# four kinds of work) it ran 1.05-5.15x plain greedy decoding at the last measurement (3fe9c04; 0.95-5.23x
# over the three runs before). Where nothing can be copied (SmolLM2's chat answer: 1.00 tokens per step) it
# is plain decoding plus rare probes, and single runs measured 0.92-1.05x, this VM's noise; an earlier run
# measured 0.90x on a 16-token answer, where the controller's first measurements are most of the work.
# The server keeps greedy: its batch is already shared by several requests.
DEFAULT_DECODING = "auto"


def make_speculation(spec: str | None, target=None, n_ctx: int = 4096, kv_type: str = "f32",
                     load_model=None, draft: str | None = None) -> Speculation | None:
    """A decoder name -> its Speculation (None for plain decoding). load_model(name) loads a draft model;
    draft names the draft model `auto` asks where nothing can be copied (None: auto only copies)."""
    spec = (spec or "greedy").strip()
    if spec in ("greedy", "none", "plain"):
        return None
    if spec == "prompt-lookup":
        return Speculation(PromptLookup(), Controller(max_k=8))
    if spec == "auto":  # prompt lookup, and the draft model where it pays more (see auto.py)
        helper = _draft_model(draft, target, n_ctx, kv_type, load_model) if draft else None
        return Speculation(AutoDrafter(PromptLookup(), helper), Controller(max_k=8))
    if spec == "lookahead":
        from .lookahead import Lookahead

        return Speculation(Lookahead(), Controller(max_k=8))
    if spec == "self-spec":
        from .self_speculation import SelfSpeculation

        if target is None:
            raise LlambaError("self-speculative decoding needs the model")
        return Speculation(SelfSpeculation(target, n_ctx, kv_type), Controller(max_k=6))
    if spec.startswith("draft:"):
        return Speculation(_draft_model(spec[len("draft:") :], target, n_ctx, kv_type, load_model), Controller(max_k=6))
    raise BadRequestError(f"unknown decoding {spec!r} (choose from {', '.join(DECODERS)})")


def _draft_model(name: str, target, n_ctx: int, kv_type: str, load_model):
    from .draft_model import DraftModel

    if not name or load_model is None or target is None:
        raise LlambaError("draft decoding needs a model: --decoding draft:PATH_OR_NAME")
    draft = load_model(name)
    if target.key_stats is not None and draft.hp.n_vocab == target.hp.n_vocab:  # a quantized cache's keys
        draft.calibrate_keys(target.calibration_tokens)
    return DraftModel(draft, n_ctx, target.hp.n_vocab, kv_type, label=name)


__all__ = ["DECODERS", "DEFAULT_DECODING", "Controller", "Speculation", "SpeculationStats", "decode_tokens", "make_speculation"]
