"""Tokenizers against llama.cpp's reference ids on both real models, and tiny vocabularies whose expected
ids and pre-tokenizer splits are worked out by hand."""

from __future__ import annotations

import pytest

from llamba.errors import UnsupportedError
from llamba.formats.gguf import open_gguf
from llamba.text.tokenizer import Tokenizer
from tests.conftest import load_reference
from tests.tiny_vocab import write_bpe_vocab, write_spm_vocab


@pytest.fixture(scope="module")
def real(model_name, model_path, reference_dir):
    g = open_gguf(model_path)
    return Tokenizer(g.metadata, g.path), load_reference(reference_dir, model_name)


def test_every_corpus_line_matches_llama_cpp(real):
    tok, ref = real
    for case in ref["tokenize"]:
        assert tok.encode(case["text"], add_special=False, parse_special=False) == case["plain"], case["text"]
        assert tok.encode(case["text"], add_special=True, parse_special=True) == case["bos_special"], case["text"]
        assert tok.decode(case["plain"]) == case["text"]


def test_whole_corpus_matches_llama_cpp(real, reference_dir):
    tok, ref = real
    corpus = (reference_dir / "tokenizer_corpus.txt").read_text(encoding="utf-8")
    ids = tok.encode(corpus, add_special=False)
    assert ids == ref["tokenize_whole"]["plain"]
    assert tok.decode(ids) == corpus


def test_streaming_detokenizer_never_splits_a_character(real):
    tok, ref = real
    text = "héllo 你好 👨‍👩‍👧 ok"
    stream = tok.streamer()
    pieces = [stream.push(i) for i in tok.encode(text, add_special=False)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# --- hand-worked pre-tokenizer splits: "I'm 12345 ok\n\n  x" and "你好 world 👨‍👩‍👧!" ---------------------

TEXT_A, TEXT_B = "I'm 12345 ok\n\n  x", "你好 world 👨\u200d👩\u200d👧!"
GPT2_A = ["I", "'m", " 12345", " ok", "\n\n ", " x"]
SMOLLM_A = ["I", "'m", " ", "1", "2", "3", "4", "5", " ok", "\n\n ", " x"]
LLAMA3_A = ["I", "'m", " ", "123", "45", " ok", "\n\n", " ", " x"]
QWEN2_A = ["I", "'m", " ", "1", "2", "3", "4", "5", " ok", "\n\n", " ", " x"]
DEFAULT_A = ["I", "'", "m", " ", "123", "45", " ok", "\n\n ", " x"]
B_WHOLE_EMOJI = ["你好", " world", " 👨\u200d👩\u200d👧!"]
# deepseek's CJK class [一-龥ࠀ-一가-퟿] spans U+0800..U+4E00, which holds the zero-width joiner U+200D
B_PUNCT_SPLIT = ["你好", " world", " 👨\u200d👩\u200d👧", "!"]  # the first regex isolates punctuation
B_DEEPSEEK = ["你好", " world", " 👨", "\u200d", "👩", "\u200d", "👧", "!"]

SPLITS = {
    "gpt2": (GPT2_A, B_WHOLE_EMOJI), "gpt-2": (GPT2_A, B_WHOLE_EMOJI), "mpt": (GPT2_A, B_WHOLE_EMOJI),
    "olmo": (GPT2_A, B_WHOLE_EMOJI), "phi-2": (GPT2_A, B_WHOLE_EMOJI), "gpt-neox": (GPT2_A, B_WHOLE_EMOJI),
    "smollm": (SMOLLM_A, B_WHOLE_EMOJI), "starcoder": (SMOLLM_A, B_WHOLE_EMOJI),
    "refact": (SMOLLM_A, B_WHOLE_EMOJI), "command-r": (SMOLLM_A, B_WHOLE_EMOJI),
    "llama3": (LLAMA3_A, B_WHOLE_EMOJI), "llama-bpe": (LLAMA3_A, B_WHOLE_EMOJI),
    "qwen2": (QWEN2_A, B_WHOLE_EMOJI), "stablelm2": (QWEN2_A, B_WHOLE_EMOJI),
    "tekken": (["I", "'m", " ", "1", "2", "3", "4", "5", " ok", "\n\n", " ", " x"], B_WHOLE_EMOJI),
    "default": (DEFAULT_A, B_PUNCT_SPLIT),
    "falcon": (DEFAULT_A, B_PUNCT_SPLIT),
    "deepseek-coder": (["I", "'", "m", " ", "1", "2", "3", "4", "5", " ok", "\n", "\n", " ", " x"],
                       B_DEEPSEEK),
    "deepseek-llm": (["I", "'", "m", " ", "12345", " ok", "\n", "\n", " ", " x"],
                     B_DEEPSEEK),
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_pre_tokenizer_splits(pre, tmp_path):
    tok = Tokenizer(open_gguf(write_bpe_vocab(tmp_path / "v.gguf", pre)).metadata)
    expected_a, expected_b = SPLITS[pre]
    assert tok._pre_split(TEXT_A) == expected_a
    assert tok._pre_split(TEXT_B) == expected_b
    # byte-level BPE round-trips anything, CJK and joined emoji included
    assert tok.decode(tok.encode(TEXT_A + TEXT_B, add_special=False)) == TEXT_A + TEXT_B


def test_bpe_merges_by_rank(tmp_path):
    # "world 12 world": merges o+r, l+d (and Ġ+w, Ġw+or, Ġwor+ld for the spaced word), 1+2 when not split.
    smollm = Tokenizer(open_gguf(write_bpe_vocab(tmp_path / "s.gguf", "smollm")).metadata)
    assert smollm.encode("world 12 world", add_special=False) == [119, 257, 259, 32, 49, 50, 260]
    gpt2 = Tokenizer(open_gguf(write_bpe_vocab(tmp_path / "g.gguf", "gpt2")).metadata)
    assert gpt2.encode("world 12 world", add_special=False) == [119, 257, 259, 32, 261, 260]


def test_special_tokens_only_when_asked(tmp_path):
    tok = Tokenizer(open_gguf(write_bpe_vocab(tmp_path / "v.gguf", "gpt2")).metadata)
    text = "<|im_start|>x<tool>"
    assert tok.encode(text, add_special=False, parse_special=True) == [262, 120, 263]
    # control tokens stay text without parse_special; user-defined ones are always recognised
    plain = tok.encode(text, add_special=False, parse_special=False)
    assert 262 not in plain and plain[-1] == 263
    assert tok.decode(plain) == text


def test_whitespace_runs_and_unknown_pre_falls_back(tmp_path, caplog):
    tok = Tokenizer(open_gguf(write_bpe_vocab(tmp_path / "v.gguf", "no-such-pre")).metadata)
    assert "unknown tokenizer.ggml.pre" in caplog.text
    text = "a   \t\n  b"
    assert tok.decode(tok.encode(text, add_special=False)) == text


def test_spm_merges_by_score_with_byte_fallback(tmp_path):
    tok = Tokenizer(open_gguf(write_spm_vocab(tmp_path / "spm.gguf")).metadata)
    # "▁hello": ll (-2) first, then he (-3), ▁he (-4), ▁hell (-5), ▁hello (-6); "ö" has no token: bytes C3 B6.
    ids = tok.encode("hello wörld")
    assert ids == [1, 271, 259, 264, 3 + 0xC3, 3 + 0xB6, 265, 262, 266]
    assert tok.decode(ids) == "hello wörld"
    assert tok.encode("hi</s>", parse_special=True) == [1, 259, 260, 3 + ord("i"), 2]
    assert tok.encode("hi</s>", parse_special=False)[-4:] == [3 + ord(c) for c in "</s>"]


def test_unknown_tokenizer_model_is_clear(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), arch="llama")
    w.add_tokenizer_model("rwkv-world")
    w.add_token_list(["a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="tokenizer model 'rwkv-world'"):
        Tokenizer(open_gguf(tmp_path / "x.gguf").metadata)
