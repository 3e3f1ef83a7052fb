"""Tiny vocabularies written to GGUF, whose expected token ids are worked out by hand in the tests."""

from __future__ import annotations

from pathlib import Path

import gguf

from llamba.text.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, _byte_to_char

BPE_EXTRA = ["Ġw", "or", "Ġwor", "ld", "Ġworld", "12", "<|im_start|>", "<tool>"]
BPE_MERGES = ["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]


def write_bpe_vocab(path: Path, pre: str) -> Path:
    """Ids 0-255: the byte characters in byte order; then BPE_EXTRA (256..); <|im_start|> is a control
    token and <tool> a user-defined one."""
    tokens = _byte_to_char() + BPE_EXTRA
    types = [NORMAL] * 262 + [CONTROL, USER_DEFINED]
    return _write(path, "gpt2", pre, tokens, types, None, BPE_MERGES, add_bos=False)


SPM_NORMAL = [("▁", -1.0), ("h", -1.0), ("e", -1.0), ("l", -1.0), ("o", -1.0), ("w", -1.0), ("r", -1.0),
              ("d", -1.0), ("ll", -2.0), ("he", -3.0), ("▁he", -4.0), ("▁hell", -5.0), ("▁hello", -6.0)]


def write_spm_vocab(path: Path) -> Path:
    """<unk>=0, <s>=1, </s>=2, <0x00>..<0xFF> = 3..258, then SPM_NORMAL from 259 (▁=259 ... ▁hello=271)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in SPM_NORMAL]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(SPM_NORMAL)
    scores = [0.0] * 259 + [s for _, s in SPM_NORMAL]
    return _write(path, "llama", "default", tokens, types, scores, None, add_bos=True, space_prefix=True)


def _write(path, model, pre, tokens, types, scores, merges, add_bos, space_prefix=False) -> Path:
    w = gguf.GGUFWriter(str(path), arch="llama")
    _add_vocab(w, model, pre, tokens, types, scores, merges, add_bos, space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def add_vocab(w: gguf.GGUFWriter, kind: str, n_tokens: int) -> None:
    """The BPE or SPM vocabulary above, padded with plain tokens to n_tokens (a model's embedding rows), and
    a chat template, so a tiny model can chat."""
    if kind == "bpe":
        tokens, types = _byte_to_char() + BPE_EXTRA, [NORMAL] * 262 + [CONTROL, USER_DEFINED]
        scores, merges, add_bos, space_prefix, model, pre = None, BPE_MERGES, False, False, "gpt2", "smollm"
    else:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in SPM_NORMAL]
        types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(SPM_NORMAL)
        scores = [0.0] * 259 + [s for _, s in SPM_NORMAL]
        merges, add_bos, space_prefix, model, pre = None, True, True, "llama", "default"
    pad = n_tokens - len(tokens)
    tokens, types = tokens + [f"<extra_{i}>" for i in range(pad)], types + [NORMAL] * pad
    scores = scores + [-10.0] * pad if scores is not None else None
    _add_vocab(w, model, pre, tokens, types, scores, merges, add_bos, space_prefix)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _add_vocab(w, model, pre, tokens, types, scores, merges, add_bos, space_prefix) -> None:
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_add_space_prefix(space_prefix)
