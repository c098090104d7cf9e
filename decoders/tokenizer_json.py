"""Hugging Face `tokenizer.json` directories (read with the `tokenizers` library), behind the interface of
`decoders.tokenizer`: most current Llama-architecture repositories ship this file and no `tokenizer.model`.

The directory's `tokenizer_config.json` names the BOS/EOS/pad tokens, `generation_config.json` the ids that end a
reply (an int or a list). Ids equal transformers' `AutoTokenizer` on the same directory; `decode` equals its
`decode(ids)` (special tokens printed). `decode_bytes` is exact for the two decoders Llama-architecture files use,
byte-level BPE (Llama 3) and sentencepiece-style byte fallback with "▁" for spaces (Llama 2, Mistral), so a stream
can wait for a whole UTF-8 character; for other decoders it is the UTF-8 of `decode`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import read_json
from .tokenizer_base import TokenizerError, check_ids, special_set

JSON_FILE = "tokenizer.json"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted: {character: byte}."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _optional_json(path: Path) -> dict:
    """A JSON object file of the directory, {} when it has none (errors name the file, as `read_json`'s)."""
    return read_json(path) if path.is_file() else {}


def _token_text(entry) -> str | None:
    """A tokenizer_config.json token entry: a string, or an AddedToken dict with "content"."""
    return entry.get("content") if isinstance(entry, dict) else entry


class JsonTokenizer:
    """A `tokenizer.json` tokenizer (see the module docstring) with the interface of `decoders.tokenizer`."""

    def __init__(self, directory: str | os.PathLike):
        import tokenizers

        directory = Path(directory)
        self.path = directory / JSON_FILE
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise TokenizerError(f"{self.path}: not a readable tokenizer.json: {e}") from None
        config = _optional_json(directory / "tokenizer_config.json")
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._id_of(_token_text(config.get(k)))
                                                 for k in ("bos_token", "eos_token", "pad_token"))
        stops = _optional_json(directory / "generation_config.json").get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        self.stop_ids = set(stops) | ({self.eos_id} if self.eos_id is not None else set())
        self.chat_template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            self.chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        steps = decoder.get("decoders", [decoder])
        self._byte_level = _byte_level_alphabet() if any(d.get("type") == "ByteLevel" for d in steps) else None
        self._metaspace = any(d.get("type") == "ByteFallback" for d in steps)
        self._strip_first = sum(d.get("start", 0) for d in steps if d.get("type") == "Strip")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allowed_special=()) -> list[int]:
        """Token ids of text; special strings are parsed only when listed in allowed_special (or it is "all")."""
        allowed = special_set(allowed_special, self.special_tokens)
        ids = [self.bos_id] if bos and self.bos_id is not None else []
        if allowed in (set(), set(self.special_tokens)):  # the library splits out every special string, or none
            self.tok.encode_special_tokens = not allowed
            ids += self.tok.encode(text, add_special_tokens=False).ids
        else:
            self.tok.encode_special_tokens = True
            rest = text
            while rest:
                hits = [(rest.find(s), s) for s in allowed if s in rest]
                at, s = min(hits, key=lambda h: (h[0], -len(h[1]))) if hits else (len(rest), "")
                if at:
                    ids += self.tok.encode(rest[:at], add_special_tokens=False).ids
                if s:
                    ids.append(self.special_tokens[s])
                rest = rest[at + len(s):]
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _piece_bytes(self, i: int) -> bytes:
        if i in self._added:
            return self._added[i].encode("utf-8")
        piece = self.tok.id_to_token(i)
        if self._byte_level is not None:
            return bytes(self._byte_level[c] for c in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def decode_bytes(self, ids) -> bytes:
        """The bytes of ids (special tokens as their text)."""
        ids = check_ids(ids, self.vocab_size)
        if self._byte_level is None and not self._metaspace:
            return self.decode(ids).encode("utf-8")
        out = b"".join(self._piece_bytes(i) for i in ids)
        for _ in range(self._strip_first):  # sentencepiece-style: the dummy-prefix space of the whole text
            out = out[1:] if out.startswith(b" ") else out
        return out

    def decode(self, ids) -> str:
        """Text of ids, as the `tokenizers` library decodes them (special tokens printed)."""
        return self.tok.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        """Id of a token string (as the vocabulary spells it); KeyError when it is not one."""
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not a token of {self.path}")
        return i

    def id_to_token(self, i: int) -> str:
        """The token string of an id."""
        return self.tok.id_to_token(check_ids([i], self.vocab_size)[0])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json into directory (the config files are the model directory's own)."""
        out = Path(directory) / JSON_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(out))
        return out
