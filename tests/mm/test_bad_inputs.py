"""Nonsense given to the shipped model's Python API and to the `mm` command line: a message naming what is wrong,
exit code 2 on the command line, never a traceback."""

import json
import struct
import warnings

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import mm
from mm.apps.cli import main
from mm.assets import example
from mm.models.processor import InputError


@pytest.fixture(scope="module")
def model():
    return mm.load()


@pytest.mark.parametrize("call,message", [
    (lambda m: m.chat([5]), "message 0 must be a dict with 'role' and 'content', got 5"),
    (lambda m: m.chat(5), "a conversation must be a list of {'role', 'content'} messages, got int"),
    (lambda m: m.chat([]), "messages is empty"),
    (lambda m: m.chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
     "message 0: a text part's text must be a str, got int"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}], images=5), "images must be a list (or one item), got int"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}], max_new_tokens="5"),
     "max_new_tokens must be an integer >= 0, got '5'"),
])
def test_api_errors_name_the_problem(model, call, message):
    with pytest.raises(ValueError) as e:
        call(model)
    assert message in str(e.value)


def test_one_image_path_is_one_image(model):
    """`images="scene.png"` is one image, not a list of 39 characters."""
    scene = str(example("scene.png"))
    messages = [{"role": "user", "content": "<image>\nwhat colour is the star?"}]
    assert model.chat(messages, images=scene) == model.chat(messages, images=[scene])
    with pytest.raises(InputError, match="1 '<image>' placeholder"):
        model.chat(messages, images=[scene, scene])


@pytest.mark.parametrize("argv,message", [
    (["bench", "--sizes", "7b", "--no-vit", "--no-speech"], "mm bench: error: --sizes: unknown size(s) 7b"),
    (["chat", "--port", "99999"], "mm chat: error: --port must lie in 0..65535, got 99999"),
    (["transcribe", "--beam", "0"], "--beam must be >= 1, got 0"),
    (["transcribe", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["transcribe", "--language", "xx"], "--language / --region choose a Dolphin-style model's prompt"),
])
def test_command_line_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_quantization_variant_is_named(capsys):
    from mm.eval import bench_quant

    with pytest.raises(SystemExit) as e:
        bench_quant.main(["--variants", "bf16,w4a8"])
    assert e.value.code == 2
    assert "--variants: unknown w4a8; choose from bf16, int8" in capsys.readouterr().err


def test_out_of_memory_is_a_message_not_a_traceback(monkeypatch, capsys):
    """MemoryError from a command (e.g. decoding a huge input) ends as one line and exit 2 (issue 24 item 6)."""
    import mm.apps.cli as cli

    def exhausted(args):
        raise MemoryError()

    monkeypatch.setattr(cli, "cmd_bench", exhausted)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err == "mm bench: error: out of memory; try a smaller input, batch or model\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad media files, each named for what is wrong with it."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 30), "red").save(d / "ok.png")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:60])
    (d / "empty.png").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    (d / "notes.wav").write_text("not audio")
    sf.write(str(d / "short.wav"), np.zeros(400, np.float32), 16000)  # 25 ms
    sf.write(str(d / "nan.wav"), np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(str(d / "long.wav"), np.zeros(31 * 16000, np.float32), 16000)
    (d / "pcm.raw").write_bytes(np.zeros(1600, "<i2").tobytes())
    with open(d / "hours.wav", "wb") as f:  # 241 minutes of 8 kHz 16-bit mono silence, as a sparse file
        n_bytes = 241 * 60 * 8000 * 2
        f.write(b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000,
                16000, 2, 16) + b"data" + struct.pack("<I", n_bytes))
        f.truncate(44 + n_bytes)
    Image.new("1", (10000, 10000)).save(d / "pixels.png")  # 10^8 pixels in 12 KB: a decompression bomb
    return d


def say(m, text="hi", **kw):
    return m.chat([{"role": "user", "content": text}], **kw)


MATRIX = [  # (what, call(model, files), the message must hold)
    ("text as image", lambda m, d: m.caption(str(d / "notes.png")), "notes.png: not an image file"),
    ("truncated png", lambda m, d: m.caption(str(d / "truncated.png")), "truncated.png: corrupt or truncated"),
    ("empty image", lambda m, d: m.caption(str(d / "empty.png")), "empty.png: not an image file"),
    ("missing image", lambda m, d: m.caption(str(d / "missing.png")), "missing.png: no such image file"),
    ("image as a number", lambda m, d: m.caption(5), "expected a path, bytes, file object or PIL image, got int"),
    ("empty audio", lambda m, d: m.transcribe(str(d / "empty.wav")), "empty.wav: empty file (0 bytes)"),
    ("text as audio", lambda m, d: m.transcribe(str(d / "notes.wav")), "notes.wav: not a readable audio file"),
    ("25 ms of audio", lambda m, d: m.transcribe(str(d / "short.wav")), "short.wav: 25 ms is too short to hear"),
    ("NaN audio", lambda m, d: m.transcribe(str(d / "nan.wav")), "nan.wav: 16000 NaN/inf samples"),
    ("missing audio", lambda m, d: m.transcribe(str(d / "missing.wav")), "missing.wav: no such audio file"),
    ("audio over 30 s", lambda m, d: m.transcribe(str(d / "long.wav")), "long.wav: 31.0 s is longer than the limit of 30 s"),
    ("headerless pcm", lambda m, d: m.transcribe(str(d / "pcm.raw")), "pcm.raw: headerless PCM has no sample rate"),
    ("unknown role", lambda m, d: m.chat([{"role": "robot", "content": "hi"}]), "role 'robot'; expected system, user"),
    ("message as a string", lambda m, d: m.chat(["hi"]), "message 0 must be a dict with 'role' and 'content'"),
    ("message without content", lambda m, d: m.chat([{"role": "user"}]), "must be a dict with 'role' and 'content'"),
    ("video part", lambda m, d: m.chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
     "a content part must be a dict with type text, image or audio"),
    ("prompt past the window", lambda m, d: say(m, "red " * 2000), "exceeds the context window of 1024"),
    ("two placeholders, one image", lambda m, d: say(m, "<image><image>", images=[str(d / "ok.png")]),
     "2 '<image>' placeholder(s) but 1 image(s)"),
    ("an image without a placeholder", lambda m, d: say(m, "hi", images=[str(d / "ok.png")]),
     "0 '<image>' placeholder(s) but 1 image(s)"),
    ("temperature nan", lambda m, d: say(m, temperature=float("nan")), "temperature must be a finite number >= 0"),
    ("negative temperature", lambda m, d: say(m, temperature=-1.0), "temperature must be a finite number >= 0"),
    ("top_p 0", lambda m, d: say(m, temperature=1.0, top_p=0), "top_p must lie in (0, 1]"),
    ("top_k -1", lambda m, d: say(m, temperature=1.0, top_k=-1), "top_k must be an integer >= 0"),
    ("max_new_tokens -1", lambda m, d: say(m, max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    ("decode rescore", lambda m, d: m.transcript(str(example("question.wav")), decode="rescore"),
     "decode='rescore': the multimodal model decodes with ctc"),
]


@pytest.mark.parametrize("what,call,message", MATRIX, ids=[w for w, _, _ in MATRIX])
def test_bad_input_matrix(model, files, what, call, message):
    with pytest.raises(ValueError) as e:
        call(model, files)
    assert message in str(e.value), str(e.value)


CHECKPOINTS = [  # (what, how to spoil a copy of the shipped model's directory, the message must hold)
    ("no directory", None, "not a model directory"),
    ("config.json a list", lambda d: (d / "config.json").write_text("[1]"), "config.json: holds a JSON list"),
    ("config.json not JSON", lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    ("unknown model_type", lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
     'model_type "bert" is not one mm can load'),
    ("weights missing", lambda d: (d / "model.safetensors").unlink(), "no weights found"),
    ("weights truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "not a readable safetensors file"),
    ("text_config: an unknown key", lambda d: edit_text_config(d, hiden_size=256),
     "config.json: text_config: unknown keys ['hiden_size']"),
    ("text_config without hidden_size", lambda d: edit_text_config(d, hidden_size=None),
     "config.json: text_config lacks ['hidden_size']"),
    ("text_config null", lambda d: edit_config(d, text_config=None),
     "config.json: text_config must be a JSON object, got null"),
    ("max_position_embeddings 1e9", lambda d: edit_text_config(d, max_position_embeddings=1e9),
     "config.json: config max_position_embeddings must be a positive integer, got 1000000000.0 (float)"),
    ("hidden_size a string", lambda d: edit_text_config(d, hidden_size="256"),
     "config.json: config hidden_size must be a positive integer, got '256' (str)"),
    ("a NaN weight", lambda d: spoil_weight(d, "language_model.lm_head.weight", float("nan")),
     "tensors holding NaN or infinity: language_model.lm_head.weight"),
    ("a shard outside the directory", lambda d: shard_outside(d, "../../etc/passwd"),
     "model.safetensors.index.json: shard '../../etc/passwd' lies outside the model directory"),
]


def spoil_weight(d, name, value):
    """Put `value` in the first element of tensor `name` of d/model.safetensors."""
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    sd[name].view(-1)[0] = value
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def shard_outside(d, shard):
    """Replace d's weights by a shard index whose weight_map names `shard`."""
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"language_model.lm_head.weight": shard}}))


def edit_config(d, **changes):
    """Set (None: delete) top-level keys of d/config.json."""
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def edit_text_config(d, **changes):
    """Set (None: delete) keys of d/config.json's text_config."""
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"].update(changes)
    cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("what,spoil,message", CHECKPOINTS, ids=[w for w, _, _ in CHECKPOINTS])
def test_bad_checkpoint_matrix(tmp_path, what, spoil, message, capsys):
    import shutil

    from mm.assets import default_multimodal_dir

    d = tmp_path / "model"
    if spoil is not None:
        shutil.copytree(default_multimodal_dir(), d)
        spoil(d)
    with pytest.raises(ValueError) as e:
        mm.load(d)
    assert message in str(e.value) and str(d) in str(e.value)
    assert main(["caption", "--model", str(d)]) == 2 and message in capsys.readouterr().err


def test_llava_hf_text_config_keys_unknown_to_llama_are_named(tmp_path):
    """A llava-hf config.json's text_config: what transformers writes (llava-1.5-7b-hf's `_name_or_path`,
    `torch_dtype`; 4.x generation defaults; 5.x `use_cache`) passes quietly, any other key is named in a warning
    (transformers' Llama ignores it too, so the numbers stay the reference's)."""
    from mm.models.fusion_config import read_checkpoint
    from tests.mm.llava_fixtures import make_hf_llava

    make_hf_llava(tmp_path)
    edit_text_config(tmp_path, _name_or_path="lmsys/vicuna-7b-v1.5", torch_dtype="float16", bad_words_ids=[[5]],
                     use_cache=True, architectures=["LlamaForCausalLM"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_checkpoint(tmp_path)
    edit_text_config(tmp_path, hiden_size=64, partial_rotary_factor=0.5)
    with pytest.warns(UserWarning) as w:
        read_checkpoint(tmp_path)
    assert [str(x.message) for x in w] == [f"{tmp_path / 'config.json'}: text_config keys ['hiden_size', "
                                           "'partial_rotary_factor'] are not Llama settings; ignored"]


CLI_MATRIX = [  # (what, argv with {d} for the bad files' directory, the last line of stderr); each exits 2
    ("caption: text as image", ["caption", "{d}/notes.png"],
     "mm caption: error: image 0: {d}/notes.png: not an image file (Pillow cannot identify its format)"),
    ("caption: truncated png", ["caption", "{d}/truncated.png"],
     "mm caption: error: image 0: {d}/truncated.png: corrupt or truncated PNG image: image file is truncated"),
    ("caption: empty image", ["caption", "{d}/empty.png"],
     "mm caption: error: image 0: {d}/empty.png: not an image file (Pillow cannot identify its format)"),
    ("caption: missing image", ["caption", "{d}/missing.png"], "mm caption: error: image not found: {d}/missing.png"),
    ("caption: pixel bomb", ["caption", "{d}/pixels.png"],
     "mm caption: error: image 0: {d}/pixels.png: 100000000 pixels exceeds the limit of 89478485 pixels "
     "(PIL.Image.MAX_IMAGE_PIXELS; possible decompression bomb)"),
    ("caption: max-new-tokens -1", ["caption", "{d}/ok.png", "--max-new-tokens", "-1"],
     "mm caption: error: max_new_tokens must be an integer >= 0, got -1"),
    ("caption: batch-size 0", ["caption", "{d}/ok.png", "--batch-size", "0"],
     "mm caption: error: batch_size must be >= 1, got 0"),
    ("caption: prompt past the window", ["caption", "{d}/ok.png", "--prompt", "red " * 2000],
     "mm caption: error: prompt of 6031 tokens exceeds the context window of 1024 (max_position_embeddings)"),
    ("transcribe: text as audio", ["transcribe", "{d}/notes.wav"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/notes.wav: not a readable audio file "
     "(libsndfile: Error opening '{d}/notes.wav': Format not recognised.)"),
    ("transcribe: empty audio", ["transcribe", "{d}/empty.wav"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/empty.wav: empty file (0 bytes)"),
    ("transcribe: NaN audio", ["transcribe", "{d}/nan.wav"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/nan.wav: 16000 NaN/inf samples "
     "(first at sample 0, 0.000 s)"),
    ("transcribe: missing audio", ["transcribe", "{d}/missing.wav"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/missing.wav: no such audio file"),
    ("transcribe: headerless pcm", ["transcribe", "{d}/pcm.raw"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/pcm.raw: headerless PCM has no sample "
     "rate; pass sample_rate= (mm transcribe: --sample-rate) to read it as 16-bit signed little-endian mono, or "
     "convert it to WAV (sox -r RATE -e signed -b 16 -c 1 in.raw out.wav)"),
    ("transcribe: bad sample rate", ["transcribe", "{d}/pcm.raw", "--sample-rate", "0"],
     "mm transcribe: error: --sample-rate must be > 0, got 0"),
    ("transcribe: decode rescore", ["transcribe", "{d}/short.wav", "--decode", "rescore"],
     "mm transcribe: error: --decode rescore: the multimodal model decodes with ctc (its CTC head alone), attention "
     "(its decoder alone) or joint (both, the default)"),
    ("transcribe: 25 ms of audio", ["transcribe", "{d}/short.wav"],
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/short.wav: 25 ms is too short to hear "
     "(speech lengths [400] samples give [3] frames; every utterance needs at least 7 frames (960 samples))"),
    ("transcribe: longer than --max-minutes", ["transcribe", "{d}/long.wav", "{d}/short.wav", "--max-minutes", "0.5"],
     "mm transcribe: error: 2 of 2 files failed (the others were written): {d}/long.wav: 31.0 s (0.5 min) is longer "
     "than the limit of 0.5 min (--max-minutes); {d}/short.wav: 25 ms is too short to hear (speech lengths [400] "
     "samples give [3] frames; every utterance needs at least 7 frames (960 samples))"),
    ("transcribe: over 4 hours", ["transcribe", "{d}/hours.wav"],  # refused from the header, never decoded
     "mm transcribe: error: 1 of 1 files failed (the others were written): {d}/hours.wav: 14460.0 s (241.0 min) is "
     "longer than the limit of 240 min (--max-minutes)"),
    ("transcribe: max-minutes 0", ["transcribe", "--max-minutes", "0"],
     "mm transcribe: error: --max-minutes must be > 0, got 0.0"),
    ("transcribe: threads -1", ["transcribe", "{d}/short.wav", "--threads", "-1"],
     "mm transcribe: error: --threads must be >= 0 (0: torch's choice), got -1"),
    ("generate: threads -2", ["generate", "--prompt", "hi", "--threads", "-2"],
     "mm generate: error: --threads must be >= 0 (0: torch's choice), got -2"),
    ("serve: port 99999", ["serve", "--port", "99999"], "mm serve: error: --port must lie in 0..65535, got 99999"),
    ("serve: threads -1", ["serve", "--threads", "-1"],
     "mm serve: error: --threads must be >= 0 (0: torch's choice), got -1"),
    ("generate: max-new-tokens -5", ["generate", "--prompt", "hi", "--max-new-tokens", "-5"],
     "mm generate: error: max_new_tokens must be an integer >= 0, got -5"),
    ("generate: temperature -1", ["generate", "--prompt", "hi", "--temperature", "-1"],
     "mm generate: error: temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    ("generate: temperature nan", ["generate", "--prompt", "hi", "--temperature", "nan"],
     "mm generate: error: temperature must be a finite number >= 0 (0: greedy), got nan"),
    ("generate: top-p 5", ["generate", "--prompt", "hi", "--top-p", "5"],
     "mm generate: error: top_p must lie in (0, 1] (or None), got 5.0"),
    ("generate: top-k -3", ["generate", "--prompt", "hi", "--top-k", "-3"],
     "mm generate: error: top_k must be an integer >= 0 (0 or None: no top-k), got -3"),
    ("generate: prompt past the window", ["generate", "--prompt", "red " * 2000],
     "mm generate: error: prompt of 2002 tokens exceeds the context window of 256 (max_position_embeddings)"),
    ("generate: no model directory", ["generate", "--prompt", "hi", "--model", "{d}/missing"],
     "mm generate: error: {d}/missing: not a model directory"),
    ("chat: max-upload-mb 0", ["chat", "--max-upload-mb", "0"],
     "mm chat: error: --max-upload-mb must be > 0, got 0.0"),
    ("chat: no model directory", ["chat", "--model", "{d}/missing"],
     "mm chat: error: model directory not found: {d}/missing"),
    ("chat: port -1", ["chat", "--port", "-1"], "mm chat: error: --port must lie in 0..65535, got -1"),
]


@pytest.mark.parametrize("what,argv,message", CLI_MATRIX, ids=[w for w, _, _ in CLI_MATRIX])
def test_command_line_bad_input_matrix(files, what, argv, message, capsys):
    """Each bad input on the command line: exit code 2 and, last on stderr, one line naming the input and the limit."""
    assert main([a.replace("{d}", str(files)) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message.replace("{d}", str(files))
