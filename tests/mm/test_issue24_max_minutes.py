"""The Python API's length limit on recordings (issue 24): `transcript(path)` of the shipped multimodal model refuses a
recording longer than `max_minutes` (240 by default, as `mm transcribe --max-minutes`) from the file's header, before
a sample is decoded; None lifts the limit. (The ESPnet/Dolphin model's: tests/mm/test_transcribe.py.)"""
import struct

import numpy as np
import pytest
import soundfile as sf

import mm
from encoders.audio import MAX_MINUTES
from mm.assets import example


@pytest.fixture(scope="module")
def model():
    return mm.load()


def write_hours(path, minutes: int, rate: int = 8000):
    """A 16-bit mono WAV of `minutes` of silence as a sparse file: its header tells the length, the disk holds 44 B."""
    n_bytes = minutes * 60 * rate * 2
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate,
                2 * rate, 2, 16) + b"data" + struct.pack("<I", n_bytes))
        f.truncate(44 + n_bytes)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Reading samples from any file fails the test: what is refused must be refused from the header."""
    def read(self, *args, **kwargs):
        raise AssertionError(f"{self.name} was decoded")

    monkeypatch.setattr(sf.SoundFile, "read", read)


def test_four_hours_are_refused_from_the_header(model, tmp_path, no_decoding):
    hours = write_hours(tmp_path / "hours.wav", 241)
    assert MAX_MINUTES == 240
    with pytest.raises(ValueError) as e:
        model.transcript(str(hours))
    assert str(e.value) == f"{hours}: 14460.0 s (241.0 min) is longer than the limit of 240 min (max_minutes)"


def test_max_minutes_sets_the_limit_and_none_lifts_it(model):
    path = str(example("question.wav"))
    seconds = sf.info(path).frames / sf.info(path).samplerate
    with pytest.raises(ValueError) as e:
        model.transcript(path, max_minutes=0.01)
    assert str(e.value) == (f"{path}: {seconds:.1f} s ({seconds / 60:.1f} min) is longer than the limit of 0.01 min "
                            "(max_minutes)")
    within = model.transcript(path, max_minutes=seconds / 60 + 0.001)
    assert within.text.strip()
    assert model.transcript(path, max_minutes=None).text == within.text


def test_an_array_is_held_to_the_limit_as_it_is_read(model):
    wave = np.zeros(32000, np.float32)  # 2 s at 16 kHz: no header to read
    with pytest.raises(ValueError) as e:
        model.transcript((wave, 16000), max_minutes=1 / 60)
    assert str(e.value) == "audio 0: 2.0 s is longer than the limit of 1 s"


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_limit_that_is_not_positive_is_refused(model, bad):
    with pytest.raises(ValueError) as e:
        model.transcript(str(example("question.wav")), max_minutes=bad)
    assert str(e.value) == f"max_minutes must be > 0 (None: no limit), got {bad}"
