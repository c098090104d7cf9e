"""Tokenizers for the Llama decoder: sentencepiece (Llama 1/2) and tiktoken BPE (Llama 3) behind one interface.

Both classes offer:
    encode(text, bos=False, eos=False, allowed_special=()) -> list[int]
    decode(ids) -> str              # == decode_bytes(ids).decode("utf-8", errors="replace")
    decode_bytes(ids) -> bytes      # exact bytes, so a stream can wait for a whole UTF-8 character
    vocab_size, bos_id, eos_id, pad_id (None when absent), stop_ids, special_tokens ({text: id})
    token_to_id(token), id_to_token(id), save(directory)
and `load_tokenizer(path)` picks the class from the content of `tokenizer.model`, or reads Hugging Face's
`tokenizer.json` (`decoders.tokenizer_json`) in a directory that has no `tokenizer.model`.

Special-token text inside user text is NOT turned into special ids by default: "<|eot_id|>" or "<image>" typed by
a user is encoded as ordinary characters (as meta-llama's `encode(..., allowed_special=set())` does), so a user
cannot forge turn boundaries or media slots. Templates that need them pass `allowed_special="all"` or a set of
special strings; those are then cut out of the text and replaced by their ids.

Sentencepiece whitespace: models trained here (and Llama's) use the identity normaliser, keep repeated spaces and
add one dummy-prefix space ("▁") in front of the text, which decoding removes again. With that, `decode(encode(s))
== s` for every string without the character U+2581 ("▁"), which sentencepiece cannot tell apart from a space.
"""

import base64
import json
import os
import re
from pathlib import Path

import sentencepiece as spm
import tiktoken

from .tokenizer_base import TokenizerError, check_ids, special_set
from .tokenizer_gguf import GGUF_FILE, GGUFTokenizer
from .tokenizer_json import JSON_FILE, JsonTokenizer

# Llama 3 pre-tokenizer split pattern (meta-llama/llama3 `tokenizer.py`, same as cl100k).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
MODEL_FILE = "tokenizer.model"
SPECIALS_FILE = "tokenizer_specials.json"  # only written for tiktoken tokenizers whose specials differ from Llama 3's

# meta-llama/llama3 splits input so the Rust BPE never sees pathological inputs (stack / time blow-ups).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
LLAMA4_MIN_RANKS = 200000  # Llama 3 files hold 128000 ranks, Llama 4's about 200000


def llama3_special_tokens(num_special: int = LLAMA3_NUM_SPECIAL) -> list[str]:
    """The Llama 3 special tokens in id order (id = number of ranks + index), named as Llama 3.1+ name them
    (meta-llama/llama-models): ids 4, 5, 8, 10 and 11, reserved in Llama 3.0 and never produced by it, are
    `<|finetune_right_pad_id|>`, `<|step_id|>`, `<|eom_id|>`, `<|python_tag|>` and `<|image|>`."""
    # ids 0-11, four a line; eom: end of message (a tool call follows), eot: end of turn
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(num_special - len(named))]


# --------------------------------------------------------------------------------------------------------------
# sentencepiece (Llama 1/2)


class SentencePieceTokenizer:
    """A sentencepiece model (Llama 1/2 style: BPE or unigram, byte fallback, bos=1, eos=2)."""

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a valid sentencepiece model: {e}") from None
        self.vocab_size = n = self.sp.get_piece_size()
        self.bos_id = self._id_or_none(self.sp.bos_id())
        self.eos_id = self._id_or_none(self.sp.eos_id())
        self.pad_id = self._id_or_none(self.sp.pad_id())
        self.unk_id = self._id_or_none(self.sp.unk_id())
        self.stop_ids = {self.eos_id} if self.eos_id is not None else set()
        # Control pieces (<s>, </s>, and our <image>-style specials) are never produced from text by sentencepiece;
        # they are what `allowed_special` may cut out of the text.
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self._piece_bytes = [self._bytes_of(i) for i in range(n)]
        # A leading "▁" on the first text piece is the dummy prefix and is dropped by sentencepiece's decoder. Ask it
        # about a piece with exactly one leading "▁" (a "▁▁" piece keeps one space either way).
        spaced = [i for i in range(n) if self._is_text(i) and self.sp.id_to_piece(i).startswith("▁")
                  and not self.sp.id_to_piece(i).startswith("▁▁")]
        self._strip_first_space = bool(spaced) and not self.sp.decode([spaced[0]]).startswith(" ")
        self._sp_no_prefix = None  # built on demand: same model without the dummy prefix

    @staticmethod
    def _id_or_none(i: int) -> int | None:
        return None if i < 0 else i

    def _is_text(self, i: int) -> bool:
        """A piece whose text is printed (normal or user-defined), as opposed to byte / control / unknown."""
        sp = self.sp
        return not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))

    def _bytes_of(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i):
            return b""
        if sp.is_byte(i):
            return bytes([int(sp.id_to_piece(i)[1:-1], 16)])  # "<0xE2>"
        if sp.is_unknown(i):
            return sp.decode([i]).encode("utf-8")  # the unk surface, " ⁇ " by default
        return sp.id_to_piece(i).replace("▁", " ").encode("utf-8")

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        """Sentencepiece ids of text; the dummy prefix is added only at the start of the whole input."""
        if at_start:
            return self.sp.encode(text)
        if self._sp_no_prefix is None:
            # Protobuf merges a repeated embedded message into the first one, so appending
            # `normalizer_spec { add_dummy_prefix: false }` (field 3 of ModelProto, field 3 of NormalizerSpec)
            # switches the prefix off and keeps everything else, without needing the protobuf package.
            proto = self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00"
            self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto)
        return self._sp_no_prefix.encode(text)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list[int]:
        """Token ids of text; special strings are parsed only when listed in allowed_special (or it is "all")."""
        allowed = special_set(allowed_special, self.special_tokens)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if not allowed:
            ids += self.sp.encode(text)
        else:
            # Text after a special token continues the same text, so it gets no new dummy-prefix space
            # (HF LlamaTokenizer with legacy=False does the same).
            split = re.compile("(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")")
            for k, part in enumerate(split.split(text)):
                if k % 2 == 1:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids += self._encode_plain(part, at_start=k == 0)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of ids (byte pieces are not merged into characters; control pieces are empty)."""
        out = []
        first = True
        for i in check_ids(ids, self.vocab_size):
            b = self._piece_bytes[i]
            if first and b:
                if self._strip_first_space and self._is_text(i) and b.startswith(b" "):
                    b = b[1:]
                first = False
            out.append(b)
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of ids, as sentencepiece decodes them (control pieces such as <s>, <image> print nothing).

        Invalid UTF-8 from stray byte pieces becomes U+FFFD by Python's "replace" rule, which may give fewer U+FFFD
        than sentencepiece (one per bad byte); valid byte sequences decode identically.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        """Id of a piece such as "▁the", "<0xE2>" or "<s>"; KeyError if the piece is not in the vocabulary."""
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token:  # sentencepiece maps unknown pieces to unk silently
            raise KeyError(f"{token!r} is not a piece of {self.path}")
        return i

    def id_to_token(self, i: int) -> str:
        """The piece string of an id (e.g. "▁the", "<0xE2>")."""
        return self.sp.id_to_piece(check_ids([i], self.vocab_size)[0])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model as directory/tokenizer.model and return that path."""
        out = Path(directory) / MODEL_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self.sp.serialized_model_proto())
        return out


# --------------------------------------------------------------------------------------------------------------
# tiktoken (Llama 3)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `base64(token_bytes) rank` per line; ranks must be 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken ranks file not found: {path}")
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path}:{lineno}: expected 'base64_token rank', got {line[:80]!r}") from None
    _check_ranks(ranks, str(path))
    return ranks


def _check_ranks(ranks: dict[bytes, int], source: str) -> None:
    if not ranks:
        raise TokenizerError(f"{source}: no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{source}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{source}: byte-level BPE needs all 256 single bytes; missing e.g. {missing[:5]}")


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> Path:
    """Write ranks in the Llama 3 `tokenizer.model` format, sorted by rank."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("".join(lines), encoding="ascii")
    return path


def _split_long_runs(s: str, max_len: int):
    """Cut s where a run of only-whitespace or only-non-whitespace characters would exceed max_len."""
    start, run, is_space = 0, 0, s[:1].isspace()
    for i, c in enumerate(s):
        if c.isspace() != is_space:
            run, is_space = 1, c.isspace()
        else:
            run += 1
        if run > max_len:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


class TiktokenTokenizer:
    """Llama 3 tokenizer: tiktoken byte-level BPE ranks plus 256 specials numbered from len(ranks)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: list[str] | None = None, pattern=LLAMA3_PATTERN,
                 path: str | os.PathLike | None = None):
        _check_ranks(ranks, str(path) if path else "ranks")
        if len(ranks) >= LLAMA4_MIN_RANKS:
            raise TokenizerError(f"{path or 'ranks'}: {len(ranks)} ranks: a Llama 4 (o200k-style) tokenizer, whose split "
                                 "pattern and special tokens differ from Llama 3's; it is not supported")
        specials = llama3_special_tokens() if special_tokens is None else list(special_tokens)
        self.path = Path(path) if path else None
        self.ranks = ranks
        self.pattern = pattern
        self.num_base_tokens = len(ranks)
        self.special_tokens = {s: self.num_base_tokens + k for k, s in enumerate(specials)}
        self.model = tiktoken.Encoding(name=self.path.name if self.path else "llama3", pat_str=pattern,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.num_base_tokens + len(specials)
        self.bos_id = self.special_tokens.get("<|begin_of_text|>")
        self.eos_id = self.special_tokens.get("<|end_of_text|>")
        self.pad_id = None  # Llama 3 has none (meta uses -1); callers pick a reserved token if they need one
        self.stop_ids = {self.special_tokens[s] for s in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
                         if s in self.special_tokens}

    @classmethod
    def from_file(cls, path: str | os.PathLike, special_tokens: list[str] | None = None) -> "TiktokenTokenizer":
        """Load a Llama 3 `tokenizer.model` ranks file (specials from tokenizer_specials.json beside it if any)."""
        path = Path(path)
        ranks = read_tiktoken_ranks(path)
        extra = path.parent / SPECIALS_FILE
        if special_tokens is None and extra.is_file():
            special_tokens = json.loads(extra.read_text(encoding="utf-8"))
        return cls(ranks, special_tokens, path=path)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list[int]:
        """Token ids of text; special strings are parsed only when listed in allowed_special (or it is "all")."""
        allowed = special_set(allowed_special, self.special_tokens)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=() : special text not allowed is plain text, never an error
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of ids (special tokens as their text)."""
        return self.model.decode_bytes(check_ids(ids, self.vocab_size))

    def decode(self, ids) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a special token string, or of an ordinary token given as str (UTF-8) or bytes."""
        if isinstance(token, str) and token in self.special_tokens:
            return self.special_tokens[token]
        key = token.encode("utf-8") if isinstance(token, str) else token
        if key not in self.ranks:
            raise KeyError(f"{token!r} is not a token of this vocabulary")
        return self.ranks[key]

    def id_to_token(self, i: int) -> str:
        """Token text of an id; a token that is only part of a UTF-8 character shows U+FFFD (see token_bytes)."""
        return self.token_bytes(i).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        """The exact bytes of one token."""
        return self.decode_bytes([i])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write directory/tokenizer.model (plus tokenizer_specials.json when the specials are not Llama 3's)."""
        directory = Path(directory)
        out = write_tiktoken_ranks(self.ranks, directory / MODEL_FILE)
        specials = list(self.special_tokens)
        if specials != llama3_special_tokens():
            (directory / SPECIALS_FILE).write_text(json.dumps(specials, ensure_ascii=False), encoding="utf-8")
        return out


# --------------------------------------------------------------------------------------------------------------


Tokenizer = SentencePieceTokenizer | TiktokenTokenizer | JsonTokenizer | GGUFTokenizer

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n?")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.model` (a file, or a directory holding one; sentencepiece or tiktoken ranks, told apart by
    content) or, in a directory without one, Hugging Face's `tokenizer.json`; or the tokenizer stored in a GGUF
    file (`decoders.tokenizer_gguf`: a `.gguf` model file, or a directory's `tokenizer.gguf`)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file() and (path / JSON_FILE).is_file():
            return JsonTokenizer(path)
        if not (path / MODEL_FILE).is_file() and (path / GGUF_FILE).is_file():
            return GGUFTokenizer(path / GGUF_FILE)
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (nor {path.parent / JSON_FILE})")
    with open(path, "rb") as f:
        first_line = f.readline(4096)
    if first_line.startswith(b"GGUF"):  # the GGUF magic
        return GGUFTokenizer(path)
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return TiktokenTokenizer.from_file(path)
    try:
        return SentencePieceTokenizer(path)
    except TokenizerError:
        raise TokenizerError(f"{path} is neither a sentencepiece model nor a tiktoken ranks file "
                             "('base64_token rank' lines)") from None
