"""The multimodal model, its processor and the tiny recipe, on a smoke-sized run of the recipe (random-ish weights)."""
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from decoders.checkpoint import CheckpointError, read_safetensors
from decoders.loss import IGNORE_INDEX
from mm.models.formats import detect
from mm.models.fusion import FusionModel
from mm.models.processor import InputError
from mm.train.recipe_tiny import TinyRecipe, train_tiny, weights_digest
from mm.train.grid_probe import grid_labels
from mm.data.scenes import COLOURS, SHAPES, SIZES, Obj, render, sample_scene
from mm.data.speech_data import synthesize

import random


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    torch.set_num_threads(1)
    assert train_tiny(out, TinyRecipe.smoke(), progress=False) == out / "model"
    return out


@pytest.fixture(scope="module")
def model(run_dir):
    return FusionModel.from_pretrained(run_dir / "model")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    render(sample_scene(random.Random(3)), 64, random.Random(3)).save(d / "scene.png")
    sf.write(d / "q.wav", synthesize("what colour is the star?", "en-us").numpy(), 16000)
    return d


def test_recipe_writes_model_log_losses_and_plot(run_dir):
    assert detect(run_dir / "model") == "mm-multimodal"
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    r = TinyRecipe.smoke()
    assert [h["step"] for h in rows] == list(range(sum(r.steps)))
    assert {h["task"] for h in rows if h["stage"] > 0} == {"caption", "question", "transcribe", "spoken"}
    assert all(np.isfinite(h["loss"]) for h in rows)
    assert all("ctc_loss" in h for h in rows if h.get("task") in ("transcribe", "spoken"))
    assert all("grid_loss" in h for h in rows if h.get("task") in ("caption", "question", "spoken"))
    with Image.open(run_dir / "loss.png") as im:
        assert im.format == "PNG" and im.size == (900, 500)
    assert "saved" in (run_dir / "train.log").read_text()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # no pickled code
    assert state["stage"] == 3 and set(state["grid_head"]) == {"proj.weight", "proj.bias"}
    assert not any(k.startswith("grid") for k in state["model"])  # the probe is not part of the model


def test_grid_labels_say_what_is_in_each_cell():
    scene = [Obj("star", "red", "big", 2, 0), Obj("circle", "white", "small", 0, 1)]
    labels = grid_labels(scene)
    expected = torch.zeros(9, 5, dtype=torch.long)
    expected[:, 3] = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])  # row
    expected[:, 4] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])  # column
    expected[6, :3] = torch.tensor([SHAPES.index("star") + 1, COLOURS.index("red") + 1, SIZES.index("big") + 1])
    expected[1, :3] = torch.tensor([SHAPES.index("circle") + 1, COLOURS.index("white") + 1, SIZES.index("small") + 1])
    assert torch.equal(labels, expected)


def test_resumed_run_equals_uninterrupted_run(run_dir, tmp_path):
    torch.set_num_threads(1)
    assert train_tiny(tmp_path, TinyRecipe.smoke(), progress=False, stop_after=5) is None  # inside stage 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["stage"], state["step"]) == (1, 2)
    train_tiny(tmp_path, TinyRecipe.smoke(), progress=False)
    a, b = read_safetensors(run_dir / "model" / "model.safetensors"), read_safetensors(tmp_path / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the optimizer stepped: stages 1-2 moved the adapters and the decoder away from the step-5 weights
    for part in ("projector.", "speech_adapter.", "language_model."):
        keys = [k for k in a if k.startswith(part)]
        assert keys and any(not torch.equal(a[k], state["model"][k]) for k in keys), part


def test_processor_expands_placeholders_and_labels_answers(model, media):
    proc = model.processor()
    cfg = model.config
    wave = proc.load_audio(str(media / "q.wav"))
    n_audio = int(model.feature_lengths(torch.tensor([wave.shape[0]]))[0])
    conv = [{"role": "user", "content": "<image>\n<audio>"}, {"role": "assistant", "content": "red"}]
    out = proc(conv, [str(media / "scene.png")], [str(media / "q.wav")], add_generation_prompt=False, labels=True)
    ids = out["input_ids"][0].tolist()
    assert ids.count(cfg.image_token_index) == cfg.tokens_per_image() == 9  # 48 px, 16 px patches
    frames = wave.shape[0] // 160 + 1  # log-mel frames, then 4x subsampling, then 4x stacking (rounded up)
    assert ids.count(cfg.audio_token_id) == n_audio == -(-(((frames - 1) // 2 - 1) // 2) // 4)
    first_audio = ids.index(cfg.audio_token_id)
    assert ids[first_audio:first_audio + n_audio] == [cfg.audio_token_id] * n_audio  # one run, where <audio> was
    assert ids.index(cfg.image_token_index) < first_audio  # in placeholder order
    labels = out["labels"][0]
    kept = labels[labels != IGNORE_INDEX].tolist()
    assert kept == model.tokenizer.encode("red") + [model.tokenizer.eos_id]
    assert torch.equal(out["speech"][0], wave) and out["speech_lengths"].tolist() == [wave.shape[0]]
    parts = [{"role": "user", "content": [{"type": "image", "image": str(media / "scene.png")}, {"type": "text", "text": "\n"},
                                          {"type": "audio", "audio": str(media / "q.wav")}]},
             {"role": "assistant", "content": "red"}]
    same = proc(parts, add_generation_prompt=False, labels=True)
    for k in ("input_ids", "attention_mask", "labels", "pixel_values", "speech"):
        assert torch.equal(out[k], same[k]), k


def test_features_land_at_their_tokens(model, media):
    proc = model.processor()
    out = proc([{"role": "user", "content": "<audio> and <image>?"}], [str(media / "scene.png")], [str(media / "q.wav")])
    with torch.no_grad():
        _, _, f, f_len = model.encode_speech(out["speech"], out["speech_lengths"])
        h = model.embed(out["input_ids"], out["pixel_values"], (f, f_len))
        img = model.image_features(out["pixel_values"])[0]
        vit = model.vision_tower
        by_hand = model.projector(vit.norm(vit.hidden_states(out["pixel_values"], [-1])[0][:, 1:]))[0]
    assert model.config.vision_feature_norm and torch.allclose(img, by_hand, atol=1e-6)  # final LayerNorm, no CLS
    ids = out["input_ids"][0]
    assert torch.equal(h[0, ids == model.config.audio_token_id], f[0, : int(f_len[0])])
    assert torch.equal(h[0, ids == model.config.image_token_index], img)
    text = (ids != model.config.audio_token_id) & (ids != model.config.image_token_index)
    assert torch.equal(h[0, text], model.language_model.embed(ids[text][None])[0])


def test_padded_batch_equals_rows_alone(model, media):
    proc = model.processor()
    convs = [[{"role": "user", "content": "<image>\nwhat colour is the star?"}],
             [{"role": "user", "content": "<audio>\ntranscribe the audio."}],
             [{"role": "user", "content": "<image><audio>"}]]
    images = [str(media / "scene.png"), str(media / "scene.png")]
    # equal-length audio: ESPnet's encoder (which ours matches) lets padding frames reach real ones through its
    # convolutions, so a padded speech batch is not row-independent there either; here the prompts are padded
    audios = [str(media / "q.wav"), (sf.read(media / "q.wav")[0], 16000)]
    batch = proc(convs, images, audios)
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 3  # really padded
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], 5,
                             speech=batch["speech"], speech_lengths=batch["speech_lengths"])[:, batch["input_ids"].shape[1]:]
    singles = [proc(convs[0], images[:1]), proc(convs[1], audios=audios[:1]), proc(convs[2], images[1:], audios[1:])]
    for b, one in enumerate(singles):
        with torch.no_grad():
            alone = model(**one).logits[0, -1]
        assert (logits[b] - alone).abs().max() < 1e-4
        solo = model.generate(one["input_ids"], one["pixel_values"], one["attention_mask"], 5, speech=one["speech"],
                              speech_lengths=one["speech_lengths"])[0, one["input_ids"].shape[1]:]  # stops at EOS
        assert torch.equal(new[b, : len(solo)], solo)
        assert set(new[b, len(solo):].tolist()) <= {model.tokenizer.eos_id}


def test_chat_streams_the_same_text(model, media):
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(media / "scene.png")},
                                         {"type": "text", "text": "\nwhat colour is the star?"}]}]
    pieces = list(model.chat(msgs, stream=True, max_new_tokens=12))
    assert "".join(pieces).strip() == model.chat(msgs, max_new_tokens=12)
    assert model.caption(str(media / "scene.png"), max_new_tokens=8) == model.chat(
        [{"role": "user", "content": "<image>\ndescribe the image."}], images=[str(media / "scene.png")], max_new_tokens=8)


def test_bad_inputs_say_what_is_wrong(model, media, tmp_path):
    proc = model.processor()
    with pytest.raises(InputError, match="messages is empty"):
        proc([[]])
    with pytest.raises(InputError, match=r"1 '<image>' placeholder\(s\) but 2 image"):
        proc([{"role": "user", "content": "<image> hi"}], [str(media / "scene.png")] * 2)
    with pytest.raises(InputError, match=r"'<audio>' placeholder\(s\) but 1 audio"):
        proc([{"role": "user", "content": "hi"}], audios=[str(media / "q.wav")])
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(InputError, match="notes.png"):
        proc([{"role": "user", "content": "<image>"}], [str(fake)])
    with pytest.raises(InputError, match="notes.png"):
        proc([{"role": "user", "content": "<audio>"}], audios=[str(fake)])
    with pytest.raises(InputError, match="longer than the limit of 30 s"):
        proc([{"role": "user", "content": "<audio>"}], audios=[(np.zeros(16000 * 31, np.float32), 16000)])
    with pytest.raises(InputError, match="too short"):
        proc([{"role": "user", "content": "<audio>"}], audios=[(np.zeros(500, np.float32), 16000)])
    with pytest.raises(InputError, match="contains no samples"):
        proc([{"role": "user", "content": "<audio>"}], audios=[(np.zeros(0, np.float32), 16000)])
    with pytest.raises(InputError, match="content part"):
        proc([{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}])
    with pytest.raises(ValueError, match="context window"):
        model.chat([{"role": "user", "content": "star " * 600}])


def test_save_load_round_trip_and_checkpoint_errors(model, media, tmp_path):
    model.save_pretrained(tmp_path / "copy")
    again = FusionModel.from_pretrained(tmp_path / "copy")
    assert again.config == model.config
    batch = model.processor()([{"role": "user", "content": "<image><audio>"}], [str(media / "scene.png")],
                              [str(media / "q.wav")])
    with torch.no_grad():
        a, b = model(**batch).logits, again(**batch).logits
    assert torch.equal(a, b)
    sd = read_safetensors(tmp_path / "copy" / "model.safetensors")
    from safetensors.torch import save_file

    del sd["ctc.ctc_lo.weight"]
    save_file(sd, tmp_path / "copy" / "model.safetensors")
    with pytest.raises(CheckpointError, match="ctc.ctc_lo.weight"):
        FusionModel.from_pretrained(tmp_path / "copy")
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    cfg["speech_config"]["bogus"] = 1
    (tmp_path / "copy" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus"):
        FusionModel.from_pretrained(tmp_path / "copy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mm.apps.cli", "train", "--recipe", "tiny", "--smoke",
           "--out", str(tmp_path), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (tmp_path / "weights-rank0.sha256").read_text(), (tmp_path / "weights-rank1.sha256").read_text()
    assert r0 == r1
    saved = FusionModel.from_pretrained(tmp_path / "model")
    assert weights_digest(saved) + "\n" == r0  # what rank 0 saved is what both ranks hold
    assert "world size 2" in (tmp_path / "train.log").read_text()
