"""Spoken scene sentences made with espeak-ng: many voices, speeds and pitches, with noise; nothing downloaded.

A voice is an espeak-ng accent plus a variant ("en-gb-scotland+f3"). The split is by voice: a voice is held out
when (accent index + variant index) % 6 == 0, so every accent and every variant is heard in training but each
held-out voice (their combination) never is. Held-out items also take their sentences from held-out scenes
(mm.data.scenes: 'heldout' or 'novel-pairs'), so held-out figures measure new voices and new sentences together.

Clean synthesis is cached on disk (one .npy per text/voice/speed/pitch/espeak-ng version); noise is added after
the cache from the item's own seed, so the same seed gives the same samples. Needs the `espeak-ng` program
(Debian/Ubuntu: `apt-get install espeak-ng`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encoders.audio import SAMPLE_RATE, load_audio

from mm.data.scenes import Obj, describe, item_rng, render, sample_question, sample_split_scene

# gmw/* voices only: the mb/* ones need the separate mbrola program and voice files.
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "croak"]  # "" is the accent's own voice
SPEEDS = (130, 200)  # words per minute (espeak-ng -s), inclusive
PITCHES = (30, 70)  # espeak-ng -p, 0..99, inclusive
HELDOUT_MODULUS = 6
TIMEOUT_S = 30.0


class SpeechDataError(RuntimeError):
    """espeak-ng is missing or failed; the message says which command and why."""


def voice_name(accent: str, variant: str) -> str:
    """'en-gb' + 'f3' -> 'en-gb+f3'; the empty variant is the accent alone."""
    return f"{accent}+{variant}" if variant else accent


def voices(split: str | None = None) -> list[str]:
    """All voice names, or those of one split ('train' or 'heldout'); see the module docstring for the rule."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}")
    out = []
    for i, accent in enumerate(ACCENTS):
        for j, variant in enumerate(VARIANTS):
            held = (i + j) % HELDOUT_MODULUS == 0
            if split is None or held == (split == "heldout"):
                out.append(voice_name(accent, variant))
    return out


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechDataError(
            "espeak-ng is not installed (it makes the project's speech data); install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    return exe


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """The first line of `espeak-ng --version`: part of the cache key, since other versions sound different."""
    out = subprocess.run([_espeak(), "--version"], capture_output=True, text=True, timeout=TIMEOUT_S)
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


@functools.lru_cache(maxsize=1)
def installed_voices() -> tuple[frozenset[str], frozenset[str]]:
    """(languages and voice names, variant names) this espeak-ng knows; it silently falls back on unknown ones."""

    def table(arg: str) -> list[list[str]]:
        out = subprocess.run([_espeak(), arg], capture_output=True, text=True, timeout=TIMEOUT_S)
        return [line.split() for line in out.stdout.splitlines()[1:] if len(line.split()) >= 5]

    bases = {name for row in table("--voices") for name in (row[1], row[3], row[4].split("/")[-1])}
    variants = {row[4].split("/")[-1] for row in table("--voices=variant")}
    return frozenset(bases), frozenset(variants)


def check_voice(voice: str) -> None:
    """Raise a clear error for a voice espeak-ng would not really use (it would fall back without a word)."""
    base, _, variant = voice.partition("+")
    bases, variants = installed_voices()
    if base not in bases:
        raise SpeechDataError(f"espeak-ng has no voice or language {base!r} (from voice {voice!r}); "
                              "see `espeak-ng --voices`")
    if variant and variant not in variants:
        raise SpeechDataError(f"espeak-ng has no variant {variant!r} (from voice {voice!r}); "
                              "see `espeak-ng --voices=variant`")


def synthesize(text: str, voice: str = "en-us", speed: int = 175, pitch: int = 50) -> torch.Tensor:
    """Speak `text` with espeak-ng; a mono float32 waveform [S] at 16 kHz."""
    if not text.strip():
        raise ValueError("cannot synthesize empty text")
    if not 80 <= speed <= 450:
        raise ValueError(f"speed {speed} words per minute is outside espeak-ng's range 80..450")
    if not 0 <= pitch <= 99:
        raise ValueError(f"pitch {pitch} is outside espeak-ng's range 0..99")
    check_voice(voice)
    with tempfile.TemporaryDirectory(prefix="mm-espeak-") as tmp:
        wav = Path(tmp) / "speech.wav"
        # text on stdin, so a sentence starting with '-' is never read as an option
        cmd = [_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav)]
        try:
            done = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise SpeechDataError(f"{' '.join(cmd)}: no result after {TIMEOUT_S:.0f} s for text {text[:80]!r}") from e
        err = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0 or not wav.is_file() or wav.stat().st_size <= 44:
            raise SpeechDataError(f"{' '.join(cmd)} failed (exit {done.returncode}) for text {text[:80]!r}: {err}")
        waveform, _ = load_audio(wav)  # espeak-ng writes 22.05 kHz int16; resampled to 16 kHz
    if not waveform.abs().max() > 0:
        raise SpeechDataError(f"espeak-ng voice {voice!r} produced silence for text {text[:80]!r}")
    return waveform


def _cache_key(text: str, voice: str, speed: int, pitch: int) -> str:
    blob = json.dumps([espeak_version(), SAMPLE_RATE, voice, speed, pitch, text])
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_synthesize(
    text: str, voice: str, speed: int, pitch: int, cache_dir: str | os.PathLike | None
) -> torch.Tensor:
    """`synthesize`, reading and writing `cache_dir/<key>.npy` when a cache directory is given."""
    if cache_dir is None:
        return synthesize(text, voice, speed, pitch)
    key = _cache_key(text, voice, speed, pitch)
    path = Path(cache_dir) / key[:2] / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError):  # a truncated file from a killed run: make it again
            pass
    waveform = synthesize(text, voice, speed, pitch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        np.save(f, waveform.numpy())
    os.replace(f.name, path)  # atomic, so concurrent writers never leave half a file under the real name
    return waveform


def add_noise(waveform: torch.Tensor, snr_db: float, seed: int, kind: str = "white") -> torch.Tensor:
    """`waveform` plus Gaussian noise ('white', or 'pink': 1/f power) scaled to exactly `snr_db` over the clip."""
    if kind not in ("white", "pink"):
        raise ValueError(f"noise kind must be 'white' or 'pink', got {kind!r}")
    x = waveform.double().numpy()
    signal_power = float(np.mean(x**2))
    if signal_power == 0:
        raise ValueError("cannot set an SNR against a silent waveform")
    noise = np.random.default_rng(seed).standard_normal(x.shape[-1])
    if kind == "pink":  # shape white noise by 1/sqrt(f) in amplitude (1/f in power), DC removed
        spectrum = np.fft.rfft(noise)
        f = np.arange(spectrum.shape[-1], dtype=np.float64)
        spectrum[1:] /= np.sqrt(f[1:])
        spectrum[0] = 0
        noise = np.fft.irfft(spectrum, n=x.shape[-1])
    noise *= np.sqrt(signal_power / (10 ** (snr_db / 10)) / np.mean(noise**2))
    return torch.from_numpy((x + noise).astype(np.float32))


@dataclass(frozen=True)
class Utterance:
    """The recipe for one clip: what is said, by which voice, how fast and high, and how noisy."""

    text: str
    voice: str
    speed: int
    pitch: int
    snr_db: float | None  # None: clean
    noise_kind: str
    noise_seed: int


def sample_utterance(
    text: str, rng: random.Random, split: str, snr_db: float | tuple[float, float] | None
) -> Utterance:
    """A voice of `split` (held-out voices for both held-out scene splits), speed, pitch and noise for `text`."""
    voice = rng.choice(voices("train" if split == "train" else "heldout"))
    speed, pitch = rng.randint(*SPEEDS), rng.randint(*PITCHES)
    snr = rng.uniform(*snr_db) if isinstance(snr_db, tuple) else snr_db
    return Utterance(text, voice, speed, pitch, snr, rng.choice(["white", "pink"]), rng.getrandbits(32))


def speak(u: Utterance, cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """The waveform [S] of one utterance at 16 kHz."""
    waveform = cached_synthesize(u.text, u.voice, u.speed, u.pitch, cache_dir)
    return waveform if u.snr_db is None else add_noise(waveform, u.snr_db, u.noise_seed, u.noise_kind)


def transcript(text: str) -> str:
    """What can be heard of a sentence: lower case, punctuation dropped, single spaces."""
    return " ".join("".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split())


@dataclass
class SpeechExample:
    """A spoken sentence: waveform [S] at 16 kHz, the sentence as written, and how it was spoken."""

    waveform: torch.Tensor
    text: str
    utterance: Utterance
    scene: list[Obj]  # the scene the sentence is about


def speak_all(utts: list[Utterance], cache_dir, workers: int) -> list[torch.Tensor]:
    if workers <= 1:
        return [speak(u, cache_dir) for u in utts]
    with ThreadPoolExecutor(workers) as pool:  # espeak-ng runs as a subprocess: threads overlap fine
        return list(pool.map(lambda u: speak(u, cache_dir), utts))


def speech_examples(
    n: int,
    split: str = "train",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    snr_db: float | tuple[float, float] | None = (10.0, 30.0),
    max_objects: int = 3,
    workers: int = 1,
) -> list[SpeechExample]:
    """`n` spoken scene captions and questions (half each) of `split`, the same for the same arguments.

    `snr_db`: None for clean speech, a number for a fixed SNR, a (low, high) range to draw from per item.
    """
    utts, scenes = [], []
    for i in range(n):
        rng = item_rng(seed, split, "speech", i)
        scene = sample_split_scene(rng, split, max_objects)
        text = describe(scene) if rng.random() < 0.5 else sample_question(scene, rng).question
        utts.append(sample_utterance(text, rng, split, snr_db))
        scenes.append(scene)
    waves = speak_all(utts, cache_dir, workers)
    return [SpeechExample(w, u.text, u, scene) for w, u, scene in zip(waves, utts, scenes)]


def speech_pairs(n: int, split: str = "train", seed: int = 0, **kwargs) -> list[tuple[torch.Tensor, str]]:
    """(waveform [S] at 16 kHz, sentence) pairs; keyword arguments as for `speech_examples`."""
    return [(e.waveform, e.text) for e in speech_examples(n, split, seed, **kwargs)]


@dataclass
class SpokenQuestion:
    """An image, a spoken question about it, and the answer in text."""

    image: object  # PIL.Image.Image
    waveform: torch.Tensor  # [S] at 16 kHz
    question: str
    answer: str
    scene: list[Obj]
    utterance: Utterance


def spoken_questions(
    n: int,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    snr_db: float | tuple[float, float] | None = (10.0, 30.0),
    max_objects: int = 3,
    workers: int = 1,
) -> list[SpokenQuestion]:
    """`n` (image, spoken question, answer) items of `split`: held-out scenes spoken by held-out voices."""
    items = []
    for i in range(n):
        rng = item_rng(seed, split, "spoken-question", i)
        scene = sample_split_scene(rng, split, max_objects)
        qa = sample_question(scene, rng)
        items.append((scene, render(scene, size, rng), qa, sample_utterance(qa.question, rng, split, snr_db)))
    waves = speak_all([u for *_, u in items], cache_dir, workers)
    return [
        SpokenQuestion(image, w, qa.question, qa.answer, scene, u) for (scene, image, qa, u), w in zip(items, waves)
    ]
