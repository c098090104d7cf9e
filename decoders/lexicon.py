"""A word lexicon as a scorer of subword tokens: the look-ahead word language model of Hori et al. 2018 ("End-to-end
speech recognition with word-based RNN language models"), with a unigram word model over a prefix tree.

Each word w of the lexicon has a probability P(w) (uniform, or from counts). A node n of the prefix tree (the letters
of the word being spelled so far) holds the mass M(n) = sum of P(w) over the words below it, and E(n) = P(w) of the
word that ends there (0 if none). A token that adds letters moving from node n to node m scores log M(m) / M(n); the
word boundary after it (a token starting with "▁", or eos) scores log E(m) / M(m). A word spelled through the tree
thus scores log P(w) in all, spread over its tokens so that a beam can prune a misspelling as soon as it starts. A
word that leaves the tree (the next letter has no child, or a boundary where no word ends) scores log P_unk / M(n)
there and nothing more: `unk_prob` = 0 makes the lexicon closed. Each word's end also scores `word_bonus` (a word
insertion bonus, as Kaldi's; 0 by default: on the shipped model neither +4 nor -2 helped).

`LexiconScorer` has the scorer interface of `decoders.scorers` (full below FULL_BELOW tokens, partial above) so that
`decoders.beam_search.joint_scorers` can add it, weighted, to a joint CTC/attention search (ESPnet's lm_weight).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")  # letters, with inner apostrophes or hyphens
BOUNDARY, OOV = -1, -2  # scorer states besides tree nodes: no word under way; a word outside the lexicon
# The lexicon's weight in a search (ESPnet's lm_weight), the default of the multimodal and the ESPnet/Dolphin models
# (untuned on the latter), chosen on the shipped multimodal model's held-out clips of everyday words of seed 2 (`mm
# eval` uses seed 1): CTC head + lexicon, beam 16, 60 clips: WER 29.8 / 28.5 / 28.5% at 0.3 / 0.5 / 0.7 (0.7 with a
# word bonus of -2). The lexicon is closed (unk_prob 0): an open one (a word outside it at P = 1e-6) let misspellings
# through (joint search, seed 1: 43.2 -> 59.1% WER).
LEXICON_WEIGHT = 0.5


class Lexicon:
    """Prefix tree of `words` (lower-cased; duplicates merged; words of count 0 left out) with P(w) = count / total
    (counts: one per word unless `counts` gives them). Node 0 is the root."""

    def __init__(self, words, counts=None):
        counts = [1.0] * len(words) if counts is None else [float(c) for c in counts]
        if len(counts) != len(words):
            raise ValueError(f"{len(words)} words but {len(counts)} counts")
        merged: dict[str, float] = {}
        for w, c in zip(words, counts):
            w = w.strip().lower()
            if not w or c < 0 or not math.isfinite(c):
                raise ValueError(f"lexicon entry {w!r}: a word needs letters and a finite count >= 0 (got {c})")
            if c > 0:
                merged[w] = merged.get(w, 0.0) + c
        total = sum(merged.values())
        if total <= 0:
            raise ValueError("an empty lexicon: give at least one word with a positive count")
        self.children: list[dict[str, int]] = [{}]
        self.mass = [0.0]  # M(n)
        self.end = [0.0]  # E(n)
        for w, c in merged.items():
            p, n = c / total, 0
            self.mass[0] += p
            for ch in w:
                m = self.children[n].get(ch)
                if m is None:
                    m = self.children[n][ch] = len(self.children)
                    self.children.append({})
                    self.mass.append(0.0)
                    self.end.append(0.0)
                n = m
                self.mass[n] += p
            self.end[n] += p
        self.n_words = len(merged)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Lexicon":
        """A lexicon from a text file: one word per line, optionally followed by its count ("word" or "word 1234"),
        as Debian's /usr/share/dict/words or a unigram count list. Lines starting with '#' are skipped."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no lexicon file (one word per line, optionally 'word count')")
        words, counts = [], []
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) > 2 or not WORD.fullmatch(parts[0]):
                raise ValueError(f"{path}:{i}: expected 'word' or 'word count', got {line.strip()!r}")
            try:
                counts.append(float(parts[1]) if len(parts) == 2 else 1.0)
            except ValueError:
                raise ValueError(f"{path}:{i}: the count {parts[1]!r} is not a number") from None
            words.append(parts[0])
        return cls(words, counts)

    def __len__(self) -> int:
        return self.n_words

    def __contains__(self, word: str) -> bool:
        n = 0
        for ch in word.lower():
            n = self.children[n].get(ch)
            if n is None:
                return False
        return self.end[n] > 0

    def log_prob(self, word: str) -> float:
        """log P(word), -inf outside the lexicon."""
        n = 0
        for ch in word.lower():
            n = self.children[n].get(ch)
            if n is None:
                return -math.inf
        return math.log(self.end[n]) if self.end[n] > 0 else -math.inf


def as_lexicon(words) -> Lexicon:
    """A Lexicon as it is, a word-list file (str or path: `Lexicon.from_file`), or an iterable of words."""
    if isinstance(words, Lexicon):
        return words
    if isinstance(words, (str, os.PathLike)):
        return Lexicon.from_file(words)
    return Lexicon(list(words))


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


class LexiconScorer:
    """The lexicon's look-ahead score of the next tokens (`pieces`: each token id's SentencePiece piece, "▁" marking
    a word's start) after each hypothesis. State: per hypothesis, the tree node of the word being spelled (BOUNDARY
    before the first word, OOV inside a word outside the lexicon). Tokens that are not text ("<...>" pieces: "<unk>",
    "<s>", bytes, a speech model's language or time tokens) score -inf except `eos`, which ends the last word.

    Below `FULL_BELOW` tokens it scores every token (a full scorer); above, as ESPnet's partial scorers, only the
    pre-beam's (and eos), working each out per (state, token) rather than a row of V (40k for Dolphin) per state."""

    FULL_BELOW = 4096

    def __init__(self, lexicon: Lexicon, pieces: list[str], eos: int, unk_prob: float = 0.0, word_bonus: float = 0.0,
                 device: torch.device | str | None = None):
        if not 0 <= unk_prob < 1:
            raise ValueError(f"unk_prob must lie in [0, 1), got {unk_prob}")
        self.lex, self.eos, self.unk, self.bonus, self.device = lexicon, eos, unk_prob, word_bonus, device
        self.pieces = [None if re.fullmatch(r"<.+>", p) else p for p in pieces]  # None: not text
        self.partial = len(pieces) >= self.FULL_BELOW
        self._steps: dict[tuple[int, int], tuple[float, int]] = {}  # (state, token) -> (score, next state)
        self._rows: dict[int, torch.Tensor] = {}  # state -> scores [V]

    def _close(self, s: int) -> float:
        """Score of a word boundary in state s."""
        if s == BOUNDARY:  # no word under way
            return 0.0
        if s == OOV:  # a word outside the lexicon, already charged
            return self.bonus
        if s == 0:  # a bare "▁": an empty word
            return -math.inf
        lex = self.lex
        return self.bonus + (_log(lex.end[s] / lex.mass[s]) if lex.end[s] > 0 else _log(self.unk / lex.mass[s]))

    def _spell(self, s: int, letters: str) -> tuple[float, int]:
        """Score and state after adding `letters` to the word in state s (a tree node or OOV)."""
        score = 0.0
        for ch in letters:
            if s == OOV:
                break
            m = self.lex.children[s].get(ch)
            if m is None:
                score, s = score + _log(self.unk / self.lex.mass[s]), OOV
            else:
                score, s = score + math.log(self.lex.mass[m] / self.lex.mass[s]), m
        return score, s

    def _step(self, s: int, t: int) -> tuple[float, int]:
        """(score, next state) of token t in state s."""
        step = self._steps.get((s, t))
        if step is None:
            p = self.pieces[t]
            if t == self.eos:
                step = self._close(s), BOUNDARY
            elif p is None:
                step = -math.inf, s
            elif p.startswith("▁"):
                score, n = self._spell(0, p[1:])
                step = score + self._close(s), n
            else:
                step = self._spell(0 if s == BOUNDARY else s, p)
            self._steps[(s, t)] = step
        return step

    def _row(self, s: int) -> torch.Tensor:
        row = self._rows.get(s)
        if row is None:
            row = self._rows[s] = torch.tensor([self._step(s, t)[0] for t in range(len(self.pieces))],
                                               device=self.device)
        return row

    def init_state(self, utt, prefix):
        return [BOUNDARY] * len(utt)

    def score(self, yseq, states, ids=None):
        if ids is None:
            return torch.stack([self._row(s) for s in states]).to(yseq.device), states
        scores = torch.full((len(states), len(self.pieces)), -math.inf)
        for n, (s, row) in enumerate(zip(states, ids.tolist())):
            for t in row + [self.eos]:
                scores[n, t] = self._step(s, t)[0]
        return scores.to(yseq.device), states

    def select(self, states, prev, tok):
        return [self._step(states[p], t)[1] for p, t in zip(prev.tolist(), tok.tolist())]
