"""Training tokenizers for the project's own models and for tests: a Llama-style sentencepiece model, and small
byte-level BPE ranks in the Llama 3 (tiktoken) format."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from .tokenizer import LLAMA3_PATTERN, MODEL_FILE, SentencePieceTokenizer
from .tokenizer_base import TokenizerError


def train_sentencepiece(files, out_dir: str | os.PathLike, vocab_size: int, model_type: str = "bpe", special_tokens=(),
                        user_defined_symbols=(), **trainer_options) -> SentencePieceTokenizer:
    """Train a Llama-style sentencepiece model on text files; write out_dir/tokenizer.model and load it.

    special_tokens become control pieces (ids 3, 4, ... after unk=0, bos=1, eos=2): never produced from plain text,
    only through `allowed_special` or by id. user_defined_symbols are always matched in text and decode to
    themselves. The vocabulary is exactly vocab_size pieces or training fails (it must hold the 256 byte pieces,
    the 3 meta pieces, the specials and every character of the corpus).
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    files = [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"training text file not found: {f}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(input=",".join(files), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
                   model_type=model_type,
                   # Llama's settings: raw text in, every space kept, digits split, unknown characters as UTF-8 bytes.
                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                   add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
                   max_sentencepiece_length=16, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   control_symbols=list(special_tokens), user_defined_symbols=list(user_defined_symbols),
                   hard_vocab_limit=True, minloglevel=2, num_threads=1)
    options.update(trainer_options)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (420). Please set it to a value <= 387."
        raise TokenizerError(f"sentencepiece training on {files} failed: {e}") from None
    os.remove(out_dir / "tokenizer.vocab")
    return SentencePieceTokenizer(out_dir / MODEL_FILE)


def train_bpe_ranks(text: str, vocab_size: int, pattern: str = LLAMA3_PATTERN) -> dict[bytes, int]:
    """Train byte-level BPE ranks (the 256 bytes, then one merge per rank) on text split by pattern.

    Small and slow (pure Python): for building test tokenizers, not for real vocabularies.
    """
    import regex  # tiktoken's dependency; the pattern uses \\p{L}, which `re` lacks

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(w.encode("utf-8") for w in regex.findall(pattern, text))
    parts = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            p = parts[w]
            for a, b in zip(p, p[1:]):
                pairs[a, b] += n
        if not pairs:
            break  # every word is one token already
        # Most frequent pair; ties by the smaller merged bytes, so training is deterministic.
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], [-x for x in kv[0][0] + kv[0][1]]))
        ranks[a + b] = len(ranks)
        for w, p in parts.items():
            i, merged = 0, []
            while i < len(p):
                if i + 1 < len(p) and p[i] == a and p[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(p[i])
                    i += 1
            parts[w] = merged
    return ranks
