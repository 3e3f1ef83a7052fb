"""Tokenizers between Hugging Face files and GGUF metadata, both ways.

Into GGUF: `tokenizer.json` (byte-level BPE) or `tokenizer.model` (SentencePiece, read as its protobuf with the
`sentencepiece` package's own schema, so piece types and normalizer flags come through exactly). The BPE
pre-tokenizer is named as llama.cpp names it: by hashing the token ids of a fixed text, tokenized by the
`tokenizers` package. Special ids, add_bos/add_eos, merges and the chat template come through `gguf.SpecialVocab`.

Out of GGUF (`llamba export`): the same files written back, the pre-tokenizer from a table of the
definitions llamba runs. That table is also the fallback when a vocabulary's hash is not known (a fine-tune
with a grown vocabulary, a test's tiny one): an identical pre-tokenizer definition names it.
"""

from __future__ import annotations

import copy
import json
from hashlib import sha256
from pathlib import Path

import numpy as np

from ..errors import LlambaError, UnsupportedError
from ..formats.hf import read_json, read_optional_json
from ..text.tokenizer import CONTROL, NORMAL, UNUSED, USER_DEFINED

BYTE = 6
SPACE_MARK = "\u2581"  # SentencePiece's visible space

# llama.cpp's text for telling pre-tokenizers apart (convert_hf_to_gguf.py, get_vocab_base_pre)
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of CHKTXT) -> tokenizer.ggml.pre, for the pre-tokenizers llamba runs (llama.cpp's table)
PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}


# tokenizer.ggml.pre -> the Hugging Face pre_tokenizer that splits text the same way
PRE_DEFINITIONS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}
PRE_ALIASES = {"gpt2": "gpt-2", "starcoder": "smollm", "refact": "smollm", "llama3": "llama-bpe", "llama-v3": "llama-bpe"}
IGNORE_MERGES = {"llama-bpe"}  # as llamba's tokenizer: whole words in the vocabulary are taken as they are


# --------------------------------------------------------------------------------------------- into GGUF

def _canonical(definition) -> str:
    """A pre-tokenizer definition with the fields that do not change the split removed."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("trim_offsets",)}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return json.dumps(strip(definition), sort_keys=True)


def identify_pre(tokenizer_json: Path) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how it was identified: 'hash' or 'definition')."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHKTXT).ids
    except Exception as e:  # the tokenizers package raises its own exception types for a bad file
        raise LlambaError(f"{tokenizer_json}: the tokenizers package cannot load it ({e})") from None
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in PRE_HASHES:
        return PRE_HASHES[digest], "hash"
    definition = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer")
    for name, known in PRE_DEFINITIONS.items():
        if _canonical(definition) == _canonical(known):
            return name, "definition"
    raise UnsupportedError(f"{tokenizer_json}: the BPE pre-tokenizer is not recognised (hash {digest[:16]}...); "
                           f"known definitions: {', '.join(PRE_DEFINITIONS)}")


def read_bpe(folder: Path, n_vocab: int) -> dict:
    """GGUF tokenizer keys (without merges and special ids) of a byte-level BPE tokenizer.json."""
    path = folder / "tokenizer.json"
    spec = read_json(path)
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        raise LlambaError(f"{path}: not a usable tokenizer.json (no model.vocab)")
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {model.get('type')!r} is not supported without "
                               "tokenizer.model (byte-level BPE or SentencePiece)")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    n_vocab = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED)
    pre, _ = identify_pre(path)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def _spm_proto():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto()


def read_spm(folder: Path, n_vocab: int) -> dict:
    """GGUF tokenizer keys of a SentencePiece tokenizer.model, padded to the model's vocabulary, with the
    added tokens of tokenizer_config.json typed as llama.cpp types them."""
    path = folder / "tokenizer.model"
    proto = _spm_proto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or OSError
        raise LlambaError(f"{path}: not a SentencePiece model ({e})") from None
    pieces = list(proto.pieces)
    n_vocab = max(n_vocab, len(pieces))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i, piece in enumerate(pieces):
        tokens[i], scores[i], types[i] = piece.piece, piece.score, int(piece.type)
        if types[i] == USER_DEFINED:  # matched in the raw text by llama.cpp, so written with plain spaces
            tokens[i] = tokens[i].replace(SPACE_MARK, " ")
    config = read_optional_json(folder / "tokenizer_config.json")
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if 0 <= i < n_vocab and isinstance(entry, dict) and isinstance(entry.get("content"), str):
            tokens[i] = entry["content"]
            if types[i] in (NORMAL, UNUSED):
                types[i] = CONTROL if entry.get("special") else USER_DEFINED
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix)}


def read_vocab(folder: Path, n_vocab: int):
    """(GGUF tokenizer keys, gguf.SpecialVocab) of a checkpoint folder: SentencePiece when tokenizer.model is
    there (as llama.cpp prefers it), else tokenizer.json."""
    import gguf

    if (folder / "tokenizer.model").is_file():
        keys = read_spm(folder, n_vocab)
    elif (folder / "tokenizer.json").is_file():
        keys = read_bpe(folder, n_vocab)
    else:
        raise LlambaError(f"{folder}: no tokenizer.json or tokenizer.model")
    special = gguf.SpecialVocab(folder, load_merges=keys["tokenizer.ggml.model"] == "gpt2",
                                n_vocab=len(keys["tokenizer.ggml.tokens"]))
    return keys, special


# ------------------------------------------------------------------------------------------- out of GGUF

# Hugging Face's name of a special token -> GGUF's key for its id (gguf's own spelling)
SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                "sep": "seperator_token_id", "pad": "padding_token_id"}


def special_ids(metadata: dict) -> dict[str, int]:
    return {t: int(metadata[f"tokenizer.ggml.{key}"]) for t, key in SPECIAL_KEYS.items()
            if f"tokenizer.ggml.{key}" in metadata}


def tokenizer_config(metadata: dict) -> dict:
    """tokenizer_config.json: special tokens by content, add_bos/add_eos, the chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    config: dict = {f"{t}_token": tokens[i] for t, i in special_ids(metadata).items()}
    for t in ("bos", "eos", "sep"):
        if f"tokenizer.ggml.add_{t}_token" in metadata:
            config[f"add_{t}_token"] = bool(metadata[f"tokenizer.ggml.add_{t}_token"])
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config


def write_tokenizer(metadata: dict, folder: Path) -> None:
    """The tokenizer files of a GGUF vocabulary."""
    model = metadata.get("tokenizer.ggml.model")
    config = tokenizer_config(metadata)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if model == "gpt2":
        spec = bpe_tokenizer_json(metadata)
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    elif model == "llama":
        (folder / "tokenizer.model").write_bytes(spm_model(metadata).SerializeToString())
    else:
        raise UnsupportedError(f"tokenizer model {model!r} cannot be exported")


def bpe_tokenizer_json(metadata: dict) -> dict:
    """A tokenizers-package tokenizer.json for a GGUF byte-level BPE vocabulary."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in PRE_DEFINITIONS:
        raise UnsupportedError(f"pre-tokenizer {pre!r} cannot be exported (known: {', '.join(PRE_DEFINITIONS)})")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    specials = set(special_ids(metadata).values())
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": types[i] == USER_DEFINED, "special": types[i] != USER_DEFINED}
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED) or i in specials]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != UNUSED}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": copy.deepcopy(PRE_DEFINITIONS[pre]), "post_processor": _bos_template(metadata),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab,
                  "merges": list(metadata.get("tokenizer.ggml.merges", []))},
    }
    return spec


def _bos_template(metadata: dict) -> dict | None:
    """The post-processor that puts BOS first, when the vocabulary asks for it (Llama 3 does)."""
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if not metadata.get("tokenizer.ggml.add_bos_token") or bos is None:
        return None
    token = metadata["tokenizer.ggml.tokens"][bos]
    first = {"SpecialToken": {"id": token, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, first, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token: {"id": token, "ids": [bos], "tokens": [token]}}}


def spm_model(metadata: dict):
    """A SentencePiece ModelProto for a GGUF `llama` (score-ordered BPE) vocabulary."""
    proto = _spm_proto()
    tokens = metadata["tokenizer.ggml.tokens"]
    n = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores", np.zeros(n))
    types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [NORMAL] * n)]
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), kind
        if kind == USER_DEFINED:  # SentencePiece matches them after spaces became its mark
            piece.piece = token.replace(" ", SPACE_MARK)
    trainer = proto.trainer_spec
    trainer.model_type = trainer.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = BYTE in types
    # llama.cpp merges across spaces by score alone, with no split at whitespace first
    trainer.split_by_whitespace = False
    trainer.allow_whitespace_only_pieces = True
    ids = special_ids(metadata)
    trainer.unk_id, trainer.bos_id = ids.get("unk", 0), ids.get("bos", -1)
    trainer.eos_id, trainer.pad_id = ids.get("eos", -1), ids.get("pad", -1)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto
