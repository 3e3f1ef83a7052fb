"""Tokenizers built from GGUF metadata, matching llama.cpp token for token.

- `gpt2`: byte-level BPE. Text is split by the pre-tokenizer regexes llama.cpp uses for the vocabulary's
  `tokenizer.ggml.pre` (applied in sequence; each keeps both its matches and the text between them), each
  piece is mapped byte -> printable character, then merged by rank.
- `llama`: SentencePiece-style BPE by score (llama.cpp's SPM tokenizer): spaces become U+2581, the highest
  scoring adjacent pair merges first, and pieces with no token fall back to `<0xNN>` byte tokens.

Special tokens (control, user-defined) are cut out of the text first, longest first, as llama.cpp does:
user-defined ones always, control ones only with `parse_special`.
"""

from __future__ import annotations

import heapq
import logging
from functools import lru_cache

import numpy as np
import regex

from ..errors import LlambaError, UnsupportedError
from ..formats.keys import MetadataKeys

log = logging.getLogger(__name__)

# token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK_LLM = [
    r"[\r\n]",
    # escaped: these Greek and letterlike code points would otherwise be NFC-normalized by editors
    (r"\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
     r"\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"),
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]

# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "gpt2": [_GPT2], "gpt-2": [_GPT2], "phi-2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "gpt-neox": [_GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "dbrx": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2], "exaone": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"],
    "tekken": [_TEKKEN],
}
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "tekken"}  # whole words found in the vocab skip merging


@lru_cache(maxsize=None)
def _byte_to_char() -> list[str]:
    """GPT-2's reversible map of bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@lru_cache(maxsize=None)
def _char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(_byte_to_char())}


class Tokenizer:
    """Encode text to token ids and decode them back, as the model's vocabulary defines."""

    def __init__(self, metadata: dict, path: str = ""):
        keys = MetadataKeys(metadata, path, "tokenizer.ggml.")
        self.model = keys.text("model", "")
        if self.model not in ("gpt2", "llama"):
            raise UnsupportedError(f"{path}: tokenizer model {self.model!r} is not supported (supported: gpt2, llama)")
        tokens = self.tokens = keys.strings("tokens", [])
        n = len(tokens)
        if n == 0:
            raise LlambaError(f"{path}: the file has no vocabulary (tokenizer.ggml.tokens)")
        types = keys.numbers("token_type", n, whole=True)
        self.token_type = np.asarray(types, dtype=np.int32) if types is not None else np.full(n, NORMAL, np.int32)
        scores = keys.numbers("scores", n, whole=False)
        self.scores = np.asarray(scores, dtype=np.float32) if scores is not None else np.zeros(n, np.float32)
        if not np.isfinite(self.scores).all():
            raise keys.fail("scores", scores, "must be finite")
        self.token_to_id = dict(zip(tokens, range(n)))  # a duplicate keeps its last id, as llama.cpp's map does
        spm = self.model == "llama"
        self.bos_id = keys.token_id("bos_token_id", n, 1 if spm else None)
        self.eos_id = keys.token_id("eos_token_id", n, 2 if spm else None)
        self.eot_id = keys.token_id("eot_token_id", n)
        self.unk_id = keys.token_id("unknown_token_id", n, 0 if spm else None)
        self.add_bos = keys.flag("add_bos_token", spm)
        self.add_eos = keys.flag("add_eos_token", False)
        self.add_space_prefix = keys.flag("add_space_prefix", spm)
        self.pre = keys.text("pre", "default") or "default"
        if spm:
            self._spm_bytes = [self.token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
        else:
            self._init_bpe(keys.strings("merges", []))
        specials = np.flatnonzero(np.isin(self.token_type, (CONTROL, USER_DEFINED, UNKNOWN))).tolist()
        specials.sort(key=lambda i: -len(tokens[i]))
        self._specials = [(tokens[i], i, self.token_type[i] == USER_DEFINED) for i in specials if tokens[i]]
        self.eog_ids = self._end_of_generation_ids()
        self._pieces: dict[int, bytes] = {}  # filled as tokens are decoded: a whole-vocabulary table costs MBs

    # ---------------------------------------------------------------------------------------- setup

    def _init_bpe(self, merges: list[str]) -> None:
        # keyed by the merge line itself, "left right": no tuple per merge to build at load (0.1 s, 6 MB)
        self.ranks: dict[str, int] = {merge: rank for rank, merge in enumerate(merges)}
        expressions = PRE_TOKENIZERS.get(self.pre)
        if expressions is None:
            log.warning("unknown tokenizer.ggml.pre %r: using the default pre-tokenizer, as llama.cpp does", self.pre)
            expressions = PRE_TOKENIZERS["default"]
        self._splitters = [regex.compile(e) for e in expressions]
        self._ignore_merges = self.pre in IGNORE_MERGES
        self._bpe_cache: dict[str, list[int]] = {}

    def _end_of_generation_ids(self) -> set[int]:
        """EOS, EOT, and the usual turn terminators present in the vocabulary (llama.cpp's EOG set)."""
        ids = {i for i in (self.eos_id, self.eot_id) if i is not None}
        for text in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
                     "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>"):
            i = self.token_to_id.get(text)
            if i is not None and self.token_type[i] in (CONTROL, USER_DEFINED):
                ids.add(i)
        return ids

    def add_end_of_generation(self, terminator_text: str) -> None:
        """Also stop at the special token a chat template closes each turn with (taken from its text)."""
        for piece in self._partition(terminator_text.strip(), parse_special=True):
            if isinstance(piece, int):
                self.eog_ids.add(piece)
                return

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    # --------------------------------------------------------------------------------------- encode

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text; add_special adds BOS/EOS as the model asks; parse_special recognises
        control-token text such as `<|im_start|>`."""
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True  # SPM: a space prefix goes before text that starts a fragment run
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
            elif self.model == "llama":
                prefix = " " if self.add_space_prefix and prev_special else ""
                self._encode_spm((prefix + fragment).replace(" ", SPACE), out)
                prev_special = False
            else:
                self._encode_bpe(fragment, out)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of text, longest first: a list of text fragments and token ids."""
        fragments: list[str | int] = [text] if text else []
        for special, token_id, user_defined in self._specials:
            if not (user_defined or parse_special) or special not in text:
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special not in fragment:
                    cut.append(fragment)
                    continue
                parts = fragment.split(special)
                for k, part in enumerate(parts):
                    if k:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments

    def _pre_split(self, text: str) -> list[str]:
        pieces = [text]
        for splitter in self._splitters:
            split: list[str] = []
            for piece in pieces:
                at = 0
                for m in splitter.finditer(piece):
                    if m.start() > at:
                        split.append(piece[at : m.start()])
                    if m.end() > m.start():
                        split.append(m.group())
                    at = m.end()
                if at < len(piece):
                    split.append(piece[at:])
            pieces = split
        return pieces

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        table = _byte_to_char()
        cache = self._bpe_cache
        for piece in self._pre_split(text):
            word = "".join(table[b] for b in piece.encode("utf-8"))
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) < 100_000:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        if self._ignore_merges and word in self.token_to_id:
            return [self.token_to_id[word]]
        symbols = list(word)
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = -1, None
            for k in range(len(symbols) - 1):
                r = ranks.get(f"{symbols[k]} {symbols[k + 1]}")
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = k, r
            if best < 0:
                break
            pair = (symbols[best], symbols[best + 1])
            merged, k = [], 0
            while k < len(symbols):  # merge every occurrence of the winning pair, left to right
                if k < len(symbols) - 1 and (symbols[k], symbols[k + 1]) == pair:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            symbols = merged
        ids = []
        for s in symbols:
            i = self.token_to_id.get(s)
            if i is not None:
                ids.append(i)
            else:  # no token for the merged piece: its single byte characters
                ids.extend(self.token_to_id[c] for c in s if c in self.token_to_id)
        return ids

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM: merge the best-scoring adjacent pair until none forms a token."""
        if not text:
            return
        vocab, scores = self.token_to_id, self.scores
        syms = list(text)  # one symbol per code point; merged ones become "" on the right
        prev = list(range(-1, len(syms) - 1))
        nxt = list(range(1, len(syms) + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []
        merged_from: dict[str, tuple[int, int, str, str]] = {}

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            pair = syms[left] + syms[right]
            token = vocab.get(pair)
            if token is not None:
                heapq.heappush(heap, (-float(scores[token]), left, right, pair))
                merged_from[pair] = (left, right, syms[left], syms[right])

        for k in range(len(syms) - 1):
            push(k, k + 1)
        while heap:
            _, left, right, pair = heapq.heappop(heap)
            if not syms[left] or not syms[right] or syms[left] + syms[right] != pair or nxt[left] != right:
                continue
            syms[left], syms[right] = pair, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        k = 0
        while k != -1:
            self._spm_resegment(syms[k], merged_from, out)
            k = nxt[k]

    def _spm_resegment(self, piece: str, merged_from: dict, out: list[int]) -> None:
        token = self.token_to_id.get(piece)
        if token is not None:
            out.append(token)
            return
        parts = merged_from.get(piece)
        if parts is None:  # byte fallback
            for b in piece.encode("utf-8"):
                byte_token = self._spm_bytes[b]
                out.append(byte_token if byte_token is not None else self.unk_id)
            return
        self._spm_resegment(parts[2], merged_from, out)
        self._spm_resegment(parts[3], merged_from, out)

    # --------------------------------------------------------------------------------------- decode

    def piece_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for; control tokens give b'' unless special."""
        if not 0 <= token_id < self.n_vocab:
            raise LlambaError(f"token id {token_id} is out of range 0..{self.n_vocab - 1}")
        if not special and self.token_type[token_id] in (CONTROL, UNKNOWN):
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, i: int) -> bytes:
        text, kind = self.tokens[i], self.token_type[i]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if kind == BYTE or (text.startswith("<0x") and len(text) == 6 and kind != NORMAL):
            byte = _BYTE_TOKEN.fullmatch(text)
            if byte is not None:
                return bytes([int(byte.group(1), 16)])
            return text.encode("utf-8")  # a byte token that names no byte: its text, as llama.cpp shows it
        if self.model == "llama":
            return text.replace(SPACE, " ").encode("utf-8")
        table = _char_to_byte()
        try:
            return bytes(table[c] for c in text)
        except KeyError:
            return text.encode("utf-8")

    def vocabulary_bytes(self) -> list[bytes]:
        """Every token's bytes, in id order, as a grammar engine wants them: special tokens (control ones, and
        user-defined ones written like <tag>) are b"\\xff" + their text, so no grammar matches them as text
        (llguidance's convention, as its llama.cpp glue builds it)."""
        return [b"\xff" + text.encode("utf-8") if self.is_special(i) else self._piece(i)
                for i, text in enumerate(self.tokens)]

    def is_special(self, token_id: int) -> bool:
        """Whether a token is a special one (a control token, or a user-defined one written like <tag>)."""
        kind, text = self.token_type[token_id], self.tokens[token_id]
        return kind in (CONTROL, UNKNOWN) or (kind == USER_DEFINED and text.startswith("<") and text.endswith(">"))

    def decode(self, ids, special: bool = False) -> str:
        """Text of ids; special shows control tokens' text. Invalid UTF-8 becomes U+FFFD."""
        stream = self.streamer(special)
        return "".join(stream.push(int(i)) for i in ids) + stream.flush()

    def adds_prefix_space(self, token_id: int) -> bool:
        """Whether a leading space of this token, first in a text, is the one SPM added when encoding."""
        return self.model == "llama" and self.add_space_prefix and self.token_type[token_id] in (NORMAL, BYTE)

    def streamer(self, special: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, special)


class StreamingDetokenizer:
    """Turns tokens into text as they arrive, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._pending = b""
        self._first = True

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now complete (possibly '')."""
        data = self.tokenizer.piece_bytes(token_id, self.special)
        if self._first and data:
            self._first = False
            if data.startswith(b" ") and self.tokenizer.adds_prefix_space(token_id):
                data = data[1:]
        self._pending += data
        return self._take_complete()

    def _take_complete(self) -> str:
        buf = self._pending
        cut = len(buf)
        # Step back over an incomplete trailing character: at most 3 continuation bytes after a lead byte.
        for back in range(1, min(4, len(buf)) + 1):
            b = buf[-back]
            if b & 0xC0 == 0x80:
                continue
            if b & 0x80:
                need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
                if need > back:
                    cut = len(buf) - back
            break
        self._pending = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever is left at the end, invalid bytes replaced."""
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", errors="replace")
