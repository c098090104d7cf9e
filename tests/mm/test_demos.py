"""The demo scripts run as a user runs them, on checkpoints made here, and print what the API returns."""
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch
from PIL import Image

import mm
from tests.mm.llava_fixtures import make_our_llava
from tests.mm.test_asr import make_espnet_experiment, waveforms

DEMOS = Path(__file__).resolve().parents[2] / "demos"


def run(script, *args):
    out = subprocess.run([sys.executable, str(DEMOS / script), *map(str, args)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_caption_demo(tmp_path):
    make_our_llava(tmp_path / "model", seed=3)
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(image)
    want = mm.load(tmp_path / "model").caption(str(image))
    assert run("caption.py", "--model", tmp_path / "model", image) == f"{image}: {want}\n"


def test_transcribe_demo(tmp_path):
    exp = make_espnet_experiment(tmp_path / "recipe", "rel_pos")
    wav = tmp_path / "utt.wav"
    sf.write(wav, waveforms(seed=5, seconds=(1.4,))[0], 16000)
    torch.set_num_threads(1)
    want = mm.load(exp).transcribe(str(wav), timestamps=True)
    lines = run("transcribe.py", "--model", exp, wav).splitlines()
    assert lines[0] == f"{wav}: {want.text}"
    assert len(lines) == 1 + len(want.words) and want.words
    for line, w in zip(lines[1:], want.words):
        start, end, text = line.split(maxsplit=2)
        assert (float(start), float(end), text) == (round(w.start, 2), round(w.end, 2), w.text)
