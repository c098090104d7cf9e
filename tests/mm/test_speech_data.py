"""espeak-ng speech data: synthesis, determinism, cache, SNR of the added noise, the voice split."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mm.data import speech_data
from mm.data.scenes import BACKGROUND_RGB, COLOUR_RGB, questions, scene_split
from mm.data.speech_data import (
    ACCENTS,
    VARIANTS,
    SpeechDataError,
    add_noise,
    sample_utterance,
    speech_examples,
    speech_pairs,
    spoken_questions,
    synthesize,
    transcript,
    voice_name,
    voices,
)


def rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def test_synthesis_is_speech_like():
    text = "what colour is the star?"  # five words
    slow, fast = synthesize(text, "en-gb", speed=130), synthesize(text, "en-gb", speed=200)
    for w, wpm in [(slow, 130), (fast, 200)]:
        assert w.dtype == torch.float32 and w.ndim == 1
        assert rms(w) > 0.02 and float(w.abs().max()) <= 1.0
        seconds_per_word = w.shape[0] / 16000 / 5
        assert 0.6 * 60 / wpm < seconds_per_word < 1.6 * 60 / wpm, (wpm, seconds_per_word)
    assert 1.25 < slow.shape[0] / fast.shape[0] < 1.8  # about 200/130 = 1.54
    # resampled to 16 kHz: nothing above the 8 kHz Nyquist, and most energy in the speech band
    spectrum = np.abs(np.fft.rfft(slow.numpy())) ** 2
    freqs = np.fft.rfftfreq(slow.shape[0], 1 / 16000)
    assert spectrum[(freqs > 100) & (freqs < 4000)].sum() > 0.8 * spectrum.sum()


def test_every_accent_and_variant_speaks():
    # all accents with their own voice, all variants with one accent: the lists are valid for this espeak-ng
    lengths = {}
    for v in [voice_name(a, "") for a in ACCENTS] + [voice_name("en-us", v) for v in VARIANTS[1:]]:
        w = synthesize("the red square", v)
        assert rms(w) > 0.005, v
        lengths[v] = w.shape[0]
    assert len(set(lengths.values())) > len(lengths) // 3  # voices really differ


def test_same_seed_same_audio_and_cache(tmp_path):
    a = speech_examples(3, "train", seed=1, snr_db=15.0)
    b = speech_examples(3, "train", seed=1, snr_db=15.0, cache_dir=tmp_path)
    c = speech_examples(3, "train", seed=1, snr_db=15.0, cache_dir=tmp_path, workers=2)  # read from the cache
    assert len(list(tmp_path.rglob("*.npy"))) == len({(e.text, e.utterance.voice, e.utterance.speed,
                                                       e.utterance.pitch) for e in a})
    for x, y, z in zip(a, b, c):
        assert x.text == y.text == z.text and x.utterance == y.utterance == z.utterance
        assert torch.equal(x.waveform, y.waveform) and torch.equal(x.waveform, z.waveform)
    d = speech_examples(3, "train", seed=2, snr_db=15.0)
    assert [e.text for e in d] != [e.text for e in a]
    pairs = speech_pairs(2, "train", seed=1, snr_db=15.0)
    assert [t for _, t in pairs] == [e.text for e in a[:2]]  # item i does not depend on n
    assert torch.equal(pairs[0][0], a[0].waveform)


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_added_noise_has_the_requested_snr(kind, snr_db):
    clean = synthesize("how many circles are there?", "en-us+f3")
    noisy = add_noise(clean, snr_db, seed=5, kind=kind)
    noise = (noisy - clean).double()
    measured = 10 * np.log10(float(clean.double().pow(2).sum()) / float(noise.pow(2).sum()))
    assert abs(measured - snr_db) < 0.5
    assert torch.equal(noisy, add_noise(clean, snr_db, seed=5, kind=kind))
    assert not torch.equal(noisy, add_noise(clean, snr_db, seed=6, kind=kind))
    spectrum = np.abs(np.fft.rfft(noise.numpy())) ** 2
    freqs = np.fft.rfftfreq(noise.shape[0], 1 / 16000)
    low, high = spectrum[(freqs > 50) & (freqs < 500)].mean(), spectrum[(freqs > 4000) & (freqs < 7500)].mean()
    if kind == "white":
        assert 0.7 < low / high < 1.4
    else:  # 1/f: roughly 4000/500 = 8x (and more) less power per bin up high
        assert low / high > 8


def test_voice_split_is_disjoint():
    train, held = set(voices("train")), set(voices("heldout"))
    assert train.isdisjoint(held) and train | held == set(voices())
    assert len(voices()) == len(ACCENTS) * len(VARIANTS) and 0.1 < len(held) / len(voices()) < 0.25
    for i, a in enumerate(ACCENTS):  # every accent and every variant is heard in training
        assert any(voice_name(a, v) in train for v in VARIANTS)
    for v in VARIANTS:
        assert any(voice_name(a, v) in train for a in ACCENTS)
    rng = random.Random(0)
    for split, allowed in [("train", train), ("heldout", held)]:
        used = {sample_utterance("hi", rng, split, None).voice for _ in range(2000)}
        assert used <= allowed and len(used) > 0.9 * len(allowed)
    for e in speech_examples(2, "heldout", seed=0, snr_db=None):
        assert e.utterance.voice in held and scene_split(e.scene) == "heldout"
        assert e.utterance.snr_db is None


def test_spoken_questions():
    items = spoken_questions(3, "heldout", seed=4, size=64, snr_db=(10.0, 20.0))
    again = spoken_questions(3, "heldout", seed=4, size=64, snr_db=(10.0, 20.0))
    for it, it2 in zip(items, again):
        assert (it.question, it.answer) in {(q.question, q.answer) for q in questions(it.scene)}
        assert it.utterance.text == it.question and it.utterance.voice in voices("heldout")
        assert scene_split(it.scene) == "heldout" and 10.0 <= it.utterance.snr_db <= 20.0
        assert it.image.size == (64, 64)
        assert torch.equal(it.waveform, it2.waveform) and it.image.tobytes() == it2.image.tobytes()
        assert rms(it.waveform) > 0.02
        # the image shows the scene: each object's cell holds pixels of its colour
        pixels = np.asarray(it.image).astype(float)  # [H, W, 3]
        palette = {**COLOUR_RGB, **BACKGROUND_RGB}
        names, rgbs = list(palette), np.array(list(palette.values()), float)
        nearest = np.linalg.norm(pixels[:, :, None] - rgbs, axis=-1).argmin(-1)  # [H, W]
        for o in it.scene:
            block = nearest[o.row * 21:(o.row + 1) * 21, o.col * 21:(o.col + 1) * 21]
            assert (block == names.index(o.colour)).sum() > 10


def test_transcript():
    assert transcript("There are two shapes: a big red star, and a small circle.") == (
        "there are two shapes a big red star and a small circle"
    )
    assert transcript("what colour is the star?") == "what colour is the star"


def test_clear_errors(monkeypatch):
    with pytest.raises(SpeechDataError, match="no voice or language 'en-zz'"):
        synthesize("hello", "en-zz")  # espeak-ng itself would speak it with plain en
    with pytest.raises(SpeechDataError, match="no variant 'f9'"):
        synthesize("hello", "en-us+f9")
    with pytest.raises(ValueError, match="empty text"):
        synthesize("  ")
    with pytest.raises(ValueError, match="speed 20"):
        synthesize("hello", speed=20)
    with pytest.raises(ValueError, match="split must be"):
        voices("test")
    with pytest.raises(ValueError, match="silent"):
        add_noise(torch.zeros(100), 10.0, seed=0)
    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    with pytest.raises(SpeechDataError, match="apt-get install espeak-ng"):
        synthesize("hello")
