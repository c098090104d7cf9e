"""Ten minutes on the shipped multimodal model (issue 24, item 7; the ESPnet/Dolphin model's ten minutes are in
tests/mm/test_transcribe.py): `mm transcribe`'s path gives each speech run its own segment at its place, with a
progress bar over the windows, written segment by segment as they are decoded, and the memory a recording costs does not grow with its length beyond the 16 kHz
waveform (the file is decoded block by block, the silence is not decoded)."""
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mm.apps.transcribe import run_transcribe, timecode
from mm.assets import example

ROOT = Path(__file__).resolve().parents[2]
PLACES = (5.0, 301.0, 590.0)  # seconds at which the question starts in the ten minutes


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory):
    """10 minutes of silence at 16 kHz holding the bundled spoken question three times, at PLACES."""
    wave, rate = sf.read(str(example("question.wav")), dtype="float32")
    x = np.zeros(600 * rate, np.float32)
    for start in PLACES:
        x[round(start * rate): round(start * rate) + len(wave)] = wave
    path = tmp_path_factory.mktemp("long") / "ten.wav"
    sf.write(str(path), x, rate, subtype="PCM_16")
    return path


def test_ten_minutes_give_a_segment_per_speech_run_with_progress(ten_minutes, capsys):
    alone = run_transcribe([str(example("question.wav"))], None, out=io.StringIO())[0]
    out = io.StringIO()
    (got,) = run_transcribe([str(ten_minutes)], None, timestamps=True, out=out, progress=True)
    assert got.duration == 600.0 and len(got.segments) == 3
    for segment, start in zip(got.segments, PLACES):
        assert start - 0.25 <= segment.start <= start and alone.text in segment.text, segment
    lines = out.getvalue().splitlines()
    assert [line[:7] for line in lines] == ["[00:00:", "[00:05:", "[00:09:"] and all(alone.text in t for t in lines)
    assert re.search(r"transcribing: 100%\|[^|]*\| 3/3 ", capsys.readouterr().err)


class Recorder(io.StringIO):
    """An output that notes, at each flush, how many windows the model had decoded by then."""

    def __init__(self, decoded: list):
        super().__init__()
        self.decoded, self.flushes = decoded, []

    def flush(self):
        self.flushes.append((len(self.decoded), self.getvalue()))


@pytest.mark.parametrize("timestamps", [True, False])
def test_segments_are_written_as_they_are_decoded(ten_minutes, monkeypatch, timestamps):
    """Each window's text is out (flushed) before the next window is decoded; the end result is the whole transcript
    in the text format."""
    from mm.models.fusion import FusionModel

    decoded, real = [], FusionModel._segment
    monkeypatch.setattr(FusionModel, "_segment", lambda self, *a: decoded.append(1) or real(self, *a))
    out = Recorder(decoded)
    (got,) = run_transcribe([str(ten_minutes)], None, timestamps=timestamps, out=out)
    segments = [s.text.strip() for s in got.segments]
    if timestamps:
        assert out.getvalue().splitlines() == [f"[{timecode(s.start, '.')} --> {timecode(s.end, '.')}] {s.text.strip()}"
                                               for s in got.segments]
    else:
        assert out.getvalue() == got.text.strip() + "\n" == " ".join(segments) + "\n"
    for n in (1, 2):  # after n windows, the first n texts and nothing more
        text = next(v for count, v in out.flushes if count == n)
        assert all(t in text for t in segments[:n]) and text.count(segments[0]) == n, (n, text)


MEASURE = """
import sys
import mm

def status(key):  # MB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

model = mm.load()
for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the RSS now
    before = status("VmRSS:")
    model.transcript(path)
    print(status("VmHWM:") - before, flush=True)  # how far the transcript raised the RSS
"""


def test_the_memory_of_ten_minutes_is_bounded(tmp_path):
    """48 kHz stereo FLAC of silence, one minute and ten: transcribing the ten raises the RSS by less than 100 MB more
    than the one (their 16 kHz waveform is 38 MB; decoded whole, the 48 kHz stereo float samples alone are 230 MB)."""
    for minutes in (1, 10):
        with sf.SoundFile(str(tmp_path / f"{minutes}.flac"), "w", 48000, 2, "PCM_16") as f:
            for _ in range(minutes):
                f.write(np.zeros((60 * 48000, 2), np.int16))  # silence: no speech run, nothing for the model
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "1.flac"), str(tmp_path / "10.flac")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    one, ten = map(float, done.stdout.split())
    print(f"peak RSS over the RSS before: +{one:.0f} MB for 1 min, +{ten:.0f} MB for 10 min")
    assert ten - one < 100
