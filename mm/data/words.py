"""Speech outside the scene grammar: word sequences from a general English word list, and clips with no speech.

The held-out test of listening rather than of remembered sentence templates: random sequences of 3 to 8 words drawn
from the system's English word list (Debian's `wamerican`, /usr/share/dict/words: real words no one here chose)
mixed with the scenes' own words, spoken by the held-out espeak-ng voices (mm.data.speech_data). `common_words`
narrows the list to the words of everyday English (those among the most frequent by `wordfreq`), which a small
model can learn to spell from their sound; the whole list also asks it to spell words it never heard. `non_speech`
gives silence and noise clips, which should transcribe to nothing.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from encoders.audio import SAMPLE_RATE

from mm.data.scenes import COLOURS, COUNT_WORDS, SHAPES, SIZES, item_rng
from mm.data.speech_data import SpeechExample, speak_all, sample_utterance

WORDS_FILE = Path("/usr/share/dict/words")
SCENE_WORDS = sorted(set(SHAPES + COLOURS + SIZES + COUNT_WORDS[1:] + "there is are a the at on in of".split()
                         + "top bottom left right middle centre what where how many shape shapes colour".split()))
SCENE_SHARE = 0.25  # of the words of a sequence, drawn from SCENE_WORDS


@functools.lru_cache(maxsize=4)
def word_list(path: str | os.PathLike = WORDS_FILE, min_len: int = 2, max_len: int = 10) -> tuple[str, ...]:
    """The lower-case alphabetic words of a one-word-per-line list (no proper nouns, no possessives), sorted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no word list; install one (Debian/Ubuntu: `apt-get install wamerican`)")
    pattern = re.compile(rf"[a-z]{{{min_len},{max_len}}}")
    words = sorted({w for w in path.read_text(errors="replace").split() if pattern.fullmatch(w)})
    if len(words) < 2000:
        raise ValueError(f"{path}: only {len(words)} usable words; a general English list has tens of thousands")
    return tuple(words)


@functools.lru_cache(maxsize=4)
def common_words(top: int = 5000, path: str | os.PathLike = WORDS_FILE) -> tuple[str, ...]:
    """The words of the word list (`word_list(path)`) that are among the `top` most frequent English words
    (wordfreq's `top_n_list`), most frequent first: 4251 of the top 5000 with Debian's `wamerican`."""
    from wordfreq import top_n_list

    listed = set(word_list(path))
    words = tuple(w for w in top_n_list("en", top) if w in listed)
    if len(words) < 2000:
        raise ValueError(f"{path}: only {len(words)} of its words are among the {top} most frequent English words; "
                         f"the open-speech set asks for at least 2000 (raise `top`)")
    return words


def word_sequences(n: int, split: str = "heldout", seed: int = 0, words: tuple[str, ...] | None = None) -> list[str]:
    """`n` sequences of 3 to 8 words, each word from the word list or (SCENE_SHARE of them) the scene words."""
    words = words or word_list()
    out = []
    for i in range(n):
        rng = item_rng(seed, split, "word-sequence", i)
        k = rng.randint(3, 8)
        out.append(" ".join(rng.choice(SCENE_WORDS) if rng.random() < SCENE_SHARE else rng.choice(words)
                            for _ in range(k)))
    return out


def open_speech_examples(n: int, split: str = "heldout", seed: int = 0, cache_dir: str | os.PathLike | None = None,
                         snr_db: float | tuple[float, float] | None = (10.0, 30.0), workers: int = 1,
                         words: tuple[str, ...] | None = None) -> list[SpeechExample]:
    """`n` word sequences (from `words`, by default the whole word list) spoken by voices of `split` ('heldout':
    voices no training clip uses), with noise."""
    utts = [sample_utterance(text, item_rng(seed, split, "word-speech", i), split, snr_db)
            for i, text in enumerate(word_sequences(n, split, seed, words))]
    return [SpeechExample(w, u.text, u, []) for w, u in zip(speak_all(utts, cache_dir, workers), utts)]


def non_speech(n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` clips [S] of 1 to 4 s at 16 kHz with no speech: digital silence, then white and pink-ish noise at
    amplitudes from near-silent to loud, in turn."""
    clips = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        samples = int(rng.uniform(1.0, 4.0) * SAMPLE_RATE)
        kind = i % 3
        if kind == 0:
            clip = np.zeros(samples)
        else:
            clip = rng.standard_normal(samples) * 10 ** rng.uniform(-3.5, -1)
            if kind == 2:  # low-passed: a rumble rather than a hiss
                clip = np.convolve(clip, np.ones(8) / np.sqrt(8), mode="same")
        clips.append(torch.from_numpy(clip.astype(np.float32)))
    return clips
