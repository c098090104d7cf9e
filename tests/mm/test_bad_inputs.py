"""Nonsense given to the shipped model's Python API and to the `mm` command line: a message naming what is wrong,
exit code 2 on the command line, never a traceback."""

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
    ("prompt past the window", lambda m, d: say(m, "red " * 2000), "exceeds the context window of 512"),
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
]


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
