"""Streaming detokenization: token ids pushed one at a time come out as text pieces that are safe for multi-byte
characters split across tokens, and that concatenate to `tokenizer.decode(ids)`."""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is `tokenizer.decode(ids)`.

    A UTF-8 character split over several tokens (sentencepiece <0xE2><0x82><0xAC>, or partial tiktoken tokens) is
    held back until complete; sentencepiece's dummy-prefix space is dropped only at the start, as in decode.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids=()):
        """`context_ids`: tokens already shown (a prompt); the stream then continues them, leading space kept."""
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._anchor = None  # last visible id: decoding after it never strips a leading space
        for i in reversed(list(context_ids)):
            if tokenizer.decode_bytes([i]):
                self._anchor = i
                break

    def push(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly "")."""
        if self._anchor is None:
            new = self.tokenizer.decode_bytes([token_id])
        else:
            before = self.tokenizer.decode_bytes([self._anchor])
            new = self.tokenizer.decode_bytes([self._anchor, token_id])[len(before) :]
        # A token that printed nothing may still have used up sentencepiece's leading space (a lone "▁" piece);
        # only tokens that print nothing even when repeated (control tokens) keep us at the start.
        if new or self.tokenizer.decode_bytes([token_id, token_id]):
            self._anchor = token_id
        return self._utf8.decode(new)

    def flush(self) -> str:
        """Text still held back (an unfinished UTF-8 sequence becomes U+FFFD); the decoder can then be reused."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._anchor = None
        return text
