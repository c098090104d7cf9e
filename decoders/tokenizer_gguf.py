"""The tokenizer a GGUF file (llama.cpp) stores in its metadata, behind the interface of `decoders.tokenizer`.

Keys (llama.cpp's names): `tokenizer.ggml.model` "llama" (sentencepiece-style) or "gpt2" (byte-level BPE);
`tokenizer.ggml.tokens` (the vocabulary, id order), `.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte), `.scores` (llama), `.merges` and `.pre` (gpt2), the bos/eos/unknown/padding ids, `.add_bos_token`,
`.add_space_prefix`, and `tokenizer.chat_template`.

Encoding follows llama.cpp's `llama-vocab.cpp`; the BPE itself runs in the `tokenizers` library:
  - first the text is cut at special strings, longest first: user-defined tokens always (as llama.cpp does),
    control/unknown tokens only when listed in `allowed_special` (by default typed "<|im_end|>" stays text);
  - "gpt2": each remaining piece is split by the regexes of the file's pre-tokenizer (`PRE_TYPES`, applied one
    after the other, matches and gaps both kept), bytes are spelled in GPT-2's byte alphabet and merged by the file's
    merge ranks (Llama 3's pre-tokenizer first looks a whole word up in the vocabulary: `ignore_merges`);
  - "llama": spaces become "▁", a "▁" is put in front of the text and of any text after a special token
    (`add_space_prefix`, default on), then neighbouring symbols merge best score first into vocabulary pieces; a
    character no piece covers becomes its UTF-8 bytes as <0xXX> tokens. This is BPE over merges ranked by the score
    of the merged piece, which is what sentencepiece's BPE models do (a unigram model gets llama.cpp's merges, not
    sentencepiece's Viterbi segmentation).
`encode(text, bos=True)` puts BOS in front only where the file asks for one (`add_bos_token`; llama.cpp's default
when absent: yes for "llama" and Llama 3's pre-tokenizer, no otherwise), as llama.cpp's `add_special` does.

`decode` inverts `encode`: normal tokens as their bytes, control / user-defined tokens as their text (as llama.cpp
prints them with `special=true`), and, for "llama", the "▁" that encoding put in front of a text run dropped again,
so `decode(encode(s, allowed_special="all")) == s` for text without "▁". Stop ids: EOS, the file's end-of-turn /
end-of-message ids, and the control tokens llama.cpp ends generation on by name ("<|im_end|>", "<|eot_id|>", ...).
"""
from __future__ import annotations

import os
from pathlib import Path

from .gguf import open_gguf
from .tokenizer_base import TokenizerError, check_ids, special_set
from .tokenizer_json import _byte_level_alphabet

GGUF_FILE = "tokenizer.gguf"  # what `save` writes: the tokenizer metadata of a GGUF file, no tensors
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes per `tokenizer.ggml.pre` (the groups of llama.cpp's `llm_tokenizer_bpe`), in Oniguruma syntax.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # single digits
_DEFAULT = ((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"), False, False)
_LLAMA3 = ((LLAMA3_SPLIT,), True, True)
_SMOLLM = ((r"\p{N}", GPT2_SPLIT), False, False)
_QWEN2 = ((QWEN2_SPLIT,), False, False)
PRE_TYPES = {  # name: (regexes applied in turn, ignore_merges, add BOS when the file does not say)
    "default": _DEFAULT, "gpt-2": ((GPT2_SPLIT,), False, False),
    "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3,
    "smollm": _SMOLLM, "starcoder": _SMOLLM, "refact": _SMOLLM,
    "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "stablelm2": _QWEN2,
}
STOP_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
              "<|end_of_text|>")


def split_merge(m: str) -> tuple[str, str]:
    """A merge "a b" as (a, b), cut at the first space after the first character, as llama.cpp cuts it."""
    k = m.find(" ", 1)
    return (m[:k], m[k + 1:]) if k > 0 else (m, "")


def read_gguf_tokenizer(path: str | os.PathLike) -> dict:
    """{key: (value, GGUF value type, array item type or None)} of a GGUF file's `tokenizer.*` metadata."""
    from gguf import GGUFValueType

    reader = open_gguf(path, TokenizerError)
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            array = f.types[0] == GGUFValueType.ARRAY
            out[key] = (f.contents(), f.types[0], f.types[1] if array and len(f.types) > 1 else None)
    return out


class GGUFTokenizer:
    """A GGUF file's tokenizer (see the module docstring) with the interface of `decoders.tokenizer`."""

    def __init__(self, path: str | os.PathLike, metadata: dict | None = None):
        import tokenizers
        from tokenizers import Regex, models, pre_tokenizers

        self.path = Path(path)
        self.metadata = read_gguf_tokenizer(self.path) if metadata is None else metadata
        self.model = self._get("tokenizer.ggml.model", required=True)
        if self.model not in ("llama", "gpt2"):
            raise TokenizerError(f"{self.path}: tokenizer.ggml.model is {self.model!r}; supported: 'llama' "
                                 "(sentencepiece-style), 'gpt2' (byte-level BPE)")
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(self._get("tokenizer.ggml.tokens", required=True))]
        self.vocab_size = n = len(tokens)
        types = self._get("tokenizer.ggml.token_type") or [NORMAL] * n
        scores = self._get("tokenizer.ggml.scores") or [0.0] * n
        if len(types) < n or len(scores) < n:
            raise TokenizerError(f"{self.path}: tokenizer.ggml.token_type / scores hold {len(types)} / {len(scores)} "
                                 f"entries for {n} tokens")
        self.tokens, self.types = tokens, list(types[:n])
        self._ids = {t: i for i, t in enumerate(tokens)}  # a repeated text means its last id, as in llama.cpp
        spm = self.model == "llama"
        self.bos_id = self._id_key("tokenizer.ggml.bos_token_id", 1 if spm else None)
        self.eos_id = self._id_key("tokenizer.ggml.eos_token_id", 2 if spm else None)
        self.unk_id = self._id_key("tokenizer.ggml.unknown_token_id", 0 if spm else None)
        self.pad_id = self._id_key("tokenizer.ggml.padding_token_id", None)
        self.chat_template = self._get("tokenizer.chat_template")
        self.special_tokens = {t: i for i, t in enumerate(tokens) if self.types[i] in (CONTROL, UNKNOWN)}
        self._user_defined = {t: i for i, t in enumerate(tokens) if self.types[i] == USER_DEFINED}
        self._cut_order = sorted({**self.special_tokens, **self._user_defined}, key=len, reverse=True)
        self.stop_ids = {i for i in (self.eos_id, self._id_key("tokenizer.ggml.eot_token_id", None),
                                     self._id_key("tokenizer.ggml.eom_token_id", None)) if i is not None}
        self.stop_ids |= {self.special_tokens[s] for s in STOP_NAMES if s in self.special_tokens}
        self.add_space_prefix = spm and bool(self._get("tokenizer.ggml.add_space_prefix", True))

        if spm:
            self.pre = None
            add_bos = True
            model = models.BPE(vocab=self._ids, merges=self._score_merges(scores), byte_fallback=True,
                               unk_token=tokens[self.unk_id] if self.unk_id is not None else None)
            self.tok = tokenizers.Tokenizer(model)
        else:
            self.pre = self._get("tokenizer.ggml.pre") or "default"  # llama.cpp's fallback for files without one
            if self.pre not in PRE_TYPES:
                raise TokenizerError(f"{self.path}: tokenizer.ggml.pre {self.pre!r} is not a supported pre-tokenizer "
                                     f"(supported: {', '.join(sorted(PRE_TYPES))})")
            regexes, ignore_merges, add_bos = PRE_TYPES[self.pre]
            merges = [split_merge(m) for m in self._get("tokenizer.ggml.merges", required=True)]
            try:
                self.tok = tokenizers.Tokenizer(models.BPE(vocab=self._ids, merges=merges, ignore_merges=ignore_merges))
            except Exception as e:  # a merge whose parts or result are not tokens
                raise TokenizerError(f"{self.path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") \
                    from None
            self.tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self.add_bos = bool(self._get("tokenizer.ggml.add_bos_token", add_bos))
        alphabet = _byte_level_alphabet() if self.model == "gpt2" else None
        self._bytes = [self._token_bytes(i, alphabet) for i in range(n)]

    # ---------------------------------------------------------------------------------------------------------
    def _get(self, key: str, default=None, required: bool = False):
        if key not in self.metadata:
            if required:
                raise TokenizerError(f"{self.path}: the GGUF metadata key {key} is missing"
                                     + ("; the file stores no tokenizer" if key == "tokenizer.ggml.model" else ""))
            return default
        return self.metadata[key][0]

    def _id_key(self, key: str, default: int | None) -> int | None:
        i = self._get(key, default)
        if i is not None and not 0 <= int(i) < self.vocab_size:
            raise TokenizerError(f"{self.path}: {key} = {i} is outside the vocabulary of {self.vocab_size} tokens")
        return None if i is None else int(i)

    def _score_merges(self, scores) -> list[tuple[str, str]]:
        """Every split of a token into two tokens, best-scored result first (ties: lower id, shorter left part)."""
        ranked = []
        for i, t in enumerate(self.tokens):
            for k in range(1, len(t)):
                if t[:k] in self._ids and t[k:] in self._ids:
                    ranked.append((-float(scores[i]), i, k))
        ranked.sort()
        return [(self.tokens[i][:k], self.tokens[i][k:]) for _, i, k in ranked]

    def _token_bytes(self, i: int, alphabet: dict[str, int] | None) -> bytes:
        t, kind = self.tokens[i], self.types[i]
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return t.encode("utf-8")
        if kind == BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            return bytes([int(t[3:5], 16)])
        if kind != NORMAL:  # unused / undefined: llama.cpp prints nothing
            return b""
        if alphabet is None:
            return t.replace("\u2581", " ").encode("utf-8")
        return bytes(alphabet[c] for c in t) if all(c in alphabet for c in t) else t.encode("utf-8")

    def _cut(self, text: str, allowed: set[str]) -> list[str | int]:
        """text as pieces of text and ids of the special strings in it (llama.cpp's `tokenizer_st_partition`)."""
        parts: list[str | int] = [text] if text else []
        for s in self._cut_order:
            if s not in allowed and s not in self._user_defined:
                continue
            i = self._ids[s]
            cut = []
            for p in parts:
                if isinstance(p, int):
                    cut.append(p)
                    continue
                for k, q in enumerate(p.split(s)):
                    cut += ([i] if k else []) + ([q] if q else [])
            parts = cut
        return parts

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list[int]:
        """Token ids of text; special strings are parsed only when listed in allowed_special (or it is "all").
        bos=True adds BOS where the file asks for it (`add_bos_token`); eos=True always appends EOS."""
        allowed = special_set(allowed_special, self.special_tokens)
        ids = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        after_special = True
        for part in self._cut(text, allowed):
            if isinstance(part, int):
                ids.append(part)
                after_special = True
                continue
            if self.model == "llama":
                part = ("\u2581" if self.add_space_prefix and after_special else "") + part.replace(" ", "\u2581")
            ids += self.tok.encode(part, add_special_tokens=False).ids
            after_special = False
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of ids (special tokens as their text; see the module docstring for the "▁" prefix)."""
        out, at_start = [], True
        for i in check_ids(ids, self.vocab_size):
            b = self._bytes[i]
            if self.types[i] in (CONTROL, UNKNOWN, USER_DEFINED):
                at_start = True
            else:
                if at_start and self.add_space_prefix and self.types[i] != BYTE and b.startswith(b" "):
                    b = b[1:]
                at_start = False
            out.append(b)
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        """Id of a token as the file spells it ("Ġthe", "▁the", "<0x0A>", "<|im_end|>"); KeyError if absent."""
        if token not in self._ids:
            raise KeyError(f"{token!r} is not a token of {self.path}")
        return self._ids[token]

    def id_to_token(self, i: int) -> str:
        """The token of an id as the file spells it."""
        return self.tokens[check_ids([i], self.vocab_size)[0]]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer metadata (no tensors) as directory/tokenizer.gguf, which `load_tokenizer` reads."""
        import gguf

        out = Path(directory) / GGUF_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(out), "llama")
        self.write_metadata(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return out

    def write_metadata(self, writer) -> None:
        """Add this tokenizer's `tokenizer.*` keys, as read, to a `gguf.GGUFWriter`."""
        for key, (value, vtype, sub_type) in self.metadata.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
