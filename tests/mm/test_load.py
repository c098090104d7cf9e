"""`mm.load` picks the right loader for each checkpoint format, and `mm caption` runs as a console command."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import mm
import mm.assets
from decoders import CheckpointError, LlamaForCausalLM
from mm.models.llava import DEFAULT_PROMPT
from mm.models.llava import LlavaForConditionalGeneration
from tests.decoders.hf_llama import make_hf_llama
from tests.decoders.test_llama import hf_to_meta
from tests.mm.llava_fixtures import make_hf_llava, make_our_llava


def test_load_dispatches_on_format(tmp_path):
    ref = make_hf_llama(tmp_path / "llama", num_key_value_heads=2)
    model = mm.load(tmp_path / "llama")
    assert isinstance(model, LlamaForCausalLM)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-4
    (tmp_path / "meta").mkdir()
    torch.save(hf_to_meta(ref.state_dict(), ref.config), tmp_path / "meta" / "consolidated.00.pth")
    (tmp_path / "meta" / "params.json").write_text(json.dumps(dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                                   vocab_size=-1, norm_eps=1e-6)))
    with torch.no_grad():
        assert (mm.load(tmp_path / "meta")(ids) - ref(ids).logits).abs().max() < 1e-4
    make_hf_llava(tmp_path / "llava")
    assert isinstance(mm.load(tmp_path / "llava"), LlavaForConditionalGeneration)
    from mm.models.fusion import FusionModel

    assert isinstance(mm.load(), FusionModel)  # the shipped default
    text = mm.load(mm.assets.default_model_dir())  # the shipped text model
    assert isinstance(text, LlamaForCausalLM) and text.config.vocab_size == 400


def test_entry_points_refuse_a_format_they_cannot_use(tmp_path):
    from mm.models.formats import CAPTIONERS, TRANSCRIBERS, load

    make_hf_llama(tmp_path / "llama", num_key_value_heads=2)
    with pytest.raises(CheckpointError, match=r"llama checkpoint; this needs one of: llava, mm-multimodal"):
        load(tmp_path / "llama", expect=CAPTIONERS)
    with pytest.raises(CheckpointError, match=r"llama checkpoint; this needs one of: espnet, mm-asr, mm-multimodal"):
        load(tmp_path / "llama", expect=TRANSCRIBERS)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list, not an object"):
        mm.load(tmp_path / "list")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        mm.load(tmp_path / "nothing")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match='model_type "bert" is not one mm can load'):
        mm.load(tmp_path / "cfg")


def test_mm_caption_console_command(tmp_path):
    make_our_llava(tmp_path / "model", seed=3)
    paths = []
    for k, colour in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{colour}.png")
        Image.new("RGB", (40 + 8 * k, 30), colour).save(paths[-1])
    exe = shutil.which("mm")
    cmd = [exe] if exe else [sys.executable, "-m", "mm.apps.cli"]
    out = subprocess.run(cmd + ["caption", *map(str, paths), "--model", str(tmp_path / "model"), "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    want = model.captions([Image.open(p) for p in paths], prompt=DEFAULT_PROMPT, max_new_tokens=6)
    assert out.stdout.splitlines() == [f"{p}\t{w}" for p, w in zip(paths, want)]
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not an image")
    out = subprocess.run(cmd + ["caption", str(bad), "--model", str(tmp_path / "model")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "notes.png" in out.stderr and "Traceback" not in out.stderr


def test_load_espnet_experiment_and_mm_transcribe_console_command(tmp_path):
    import soundfile as sf

    from mm.models.asr import ASRModel
    from tests.mm.test_asr import make_espnet_experiment, waveforms

    exp = make_espnet_experiment(tmp_path / "recipe", "rel_pos")
    asr = mm.load(exp)
    assert isinstance(asr, ASRModel)
    wav = tmp_path / "utt.wav"
    sf.write(wav, waveforms(seed=3, seconds=(1.5,))[0], 16000)
    exe = shutil.which("mm")
    cmd = [exe] if exe else [sys.executable, "-m", "mm.apps.cli"]
    out = subprocess.run(cmd + ["transcribe", str(wav), "--model", str(exp), "--decode", "joint", "--beam", "3",
                                "--timestamps", "--format", "json", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    got = got[0] if isinstance(got, list) else got
    torch.set_num_threads(1)
    want = asr.transcribe(str(wav), decode="joint", beam=3, timestamps=True)
    assert got["text"] == want.text and len(want.tokens) >= 2
    words = [w for seg in got["segments"] for w in seg["words"]]
    assert words and all(0 <= w["start"] <= w["end"] <= 1.5 for w in words)
