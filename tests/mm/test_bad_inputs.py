"""Nonsense given to the shipped model's Python API and to the `mm` command line: a message naming what is wrong,
exit code 2 on the command line, never a traceback."""
import pytest

import mm
from mm.apps.cli import main
from mm.assets import example
from mm.models.processor import InputError


@pytest.fixture(scope="module")
def model():
    return mm.load()


@pytest.mark.parametrize("call,message", [
    (lambda m: m.chat([5]), "a conversation must be a list of {'role', 'content'} messages, got int"),
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
