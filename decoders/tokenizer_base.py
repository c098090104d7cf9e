"""What every tokenizer class shares: its error type and the checks of special strings and token ids."""
from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file or a token id that cannot be used; the message names the file or the id."""


def special_set(allowed_special, specials: dict[str, int]) -> set[str]:
    """Normalise allowed_special ("all" or an iterable of special strings) and reject unknown strings."""
    if allowed_special == "all":
        return set(specials)
    allowed = set(allowed_special)
    unknown = allowed - set(specials)
    if unknown:
        raise TokenizerError(f"allowed_special has strings that are not special tokens: {sorted(unknown)}")
    return allowed


def check_ids(ids, vocab_size: int) -> list[int]:
    """Ids as a list of Python ints, each in [0, vocab_size)."""
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i} is out of range for a vocabulary of {vocab_size} tokens")
    return ids
