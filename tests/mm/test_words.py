"""Speech outside the scene grammar: the word list, the word sequences, clips with no speech."""
from __future__ import annotations

import pytest
import torch

from mm.data.scenes import SHAPES
from mm.data.speech_data import voices
from mm.data.words import (SCENE_WORDS, WORDS_FILE, common_words, non_speech, open_speech_examples, word_list,
                           word_sequences)


def test_word_list_keeps_plain_lower_case_words(tmp_path):
    plain = [f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}" for i in range(2100)]
    f = tmp_path / "words"
    f.write_text("\n".join(plain + ["Paris", "cat's", "x", "abcdefghijk", "r2d2", "naïve", "dog"]) + "\n")
    words = word_list(f)
    assert words == tuple(sorted(plain + ["dog"]))
    small = tmp_path / "small"
    small.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="only 2 usable words"):
        word_list(small)
    with pytest.raises(FileNotFoundError, match="apt-get install wamerican"):
        word_list(tmp_path / "missing")


def test_the_system_word_list_is_general_english():
    words = set(word_list(WORDS_FILE))
    assert len(words) > 20000
    assert {"house", "water", "listen", "yellow", "quickly"} <= words
    assert not words & {"Paris", "cat's"}


def test_common_words_are_the_frequent_words_of_the_list(tmp_path):
    words = common_words(5000)
    assert len(words) == len(set(words)) and 2000 <= len(words) <= 5000
    assert set(words) <= set(word_list())
    assert words[:3] == ("the", "to", "and")  # most frequent first
    assert {"house", "water", "listen", "yellow", "quickly"} <= set(words)
    assert not set(words) & {"aardvark", "zymurgy", "quixotic"}
    assert set(common_words(3000)) < set(words)
    plain = tmp_path / "words"
    fake = [f"q{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}x" for i in range(2100)]  # no real words
    plain.write_text("\n".join(fake) + "\n")
    with pytest.raises(ValueError, match="only 0 of its words are among the 5000 most frequent"):
        common_words(5000, plain)


def test_word_sequences_from_common_words():
    common = common_words()
    seqs = word_sequences(200, seed=3, words=common)
    words = [w for s in seqs for w in s.split()]
    assert set(words) <= set(common) | set(SCENE_WORDS)
    assert len(set(words) - set(SCENE_WORDS)) > 300
    ex = open_speech_examples(1, seed=0, snr_db=None, words=common)
    assert [e.text for e in ex] == word_sequences(1, seed=0, words=common)


def test_word_sequences_mix_list_and_scene_words_reproducibly():
    seqs = word_sequences(400, seed=3)
    assert seqs == word_sequences(400, seed=3) and seqs != word_sequences(400, seed=4)
    assert word_sequences(5, split="train", seed=3) != seqs[:5]
    words = [w for s in seqs for w in s.split()]
    assert all(3 <= len(s.split()) <= 8 for s in seqs)
    scene_share = sum(w in SCENE_WORDS for w in words) / len(words)
    assert 0.2 < scene_share < 0.35  # a quarter drawn from the scene words, a few list words are scene words too
    assert len(set(words) - set(SCENE_WORDS)) > 1000  # mostly words the scenes never use
    assert set(SHAPES) <= set(SCENE_WORDS)


def test_open_speech_is_spoken_by_held_out_voices():
    ex = open_speech_examples(2, seed=0, snr_db=None)
    assert [e.text for e in ex] == word_sequences(2, seed=0)
    for e in ex:
        assert e.utterance.voice in voices("heldout") and e.scene == []
        assert e.waveform.dtype == torch.float32 and e.waveform.abs().max() > 0.05
        assert e.waveform.shape[0] > 0.15 * 16000 * len(e.text.split())  # about a word per 0.3 s or slower


def test_non_speech_is_silence_or_noise():
    clips = non_speech(9, seed=1)
    assert all(16000 <= c.shape[0] <= 4 * 16000 for c in clips)
    assert all(torch.equal(c, torch.zeros_like(c)) for c in clips[::3])
    assert all(1e-4 < c.pow(2).mean().sqrt() < 0.2 for i, c in enumerate(clips) if i % 3)
    assert all(torch.equal(a, b) for a, b in zip(clips, non_speech(9, seed=1)))
