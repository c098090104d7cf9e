"""The Gradio chat: its handler called from Python, and the served page driven by headless Chromium.

The model is the trained one (mm/models/tiny) when this checkout has it, else a smoke run of the same recipe
(random-ish weights). Either way the page must show exactly what `model.chat` answers for the same messages
(greedy decoding is deterministic), turn after turn, and a bad upload must get a clear reply without stopping
the server.
"""
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mm.assets import EXAMPLES_DIR, MODELS_DIR
from mm.apps.chat import EMPTY_REPLY, ERROR_MARK, build_parser, launch, make_respond
from mm.models.fusion import FusionModel
from mm.data.scenes import Obj, render
from mm.data.speech_data import synthesize

QUESTION = "what colour is the star?"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The trained model when present, else a smoke run of `mm train --recipe tiny` (about 15 s)."""
    trained = MODELS_DIR / "tiny"
    if (trained / "config.json").is_file():
        return trained
    from mm.train.recipe_tiny import TinyRecipe, train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny"), TinyRecipe.smoke(), progress=False)


@pytest.fixture(scope="module")
def model(model_dir):
    """The model the expected answers come from (the served one is loaded separately)."""
    return FusionModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A scene with one star (png), its spoken question (wav), a text file named .png, a PDF, a big noise png."""
    d = tmp_path_factory.mktemp("media")
    render([Obj("star", "red", "big", 0, 0), Obj("circle", "blue", "small", 2, 2)], 64, rng=1).save(d / "scene.png")
    sf.write(d / "question.wav", synthesize(QUESTION).numpy(), 16000)
    (d / "notes.png").write_text("not an image\n")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n")
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "big.png")  # 1.9 MB: noise does not compress
    return {k: str(d / f) for k, f in [("image", "scene.png"), ("audio", "question.wav"), ("fake", "notes.png"),
                                       ("pdf", "paper.pdf"), ("big", "big.png")]}


def user(*parts):
    """A user message of the model's format from ("image"|"audio"|"text", value) pairs."""
    return {"role": "user", "content": [{"type": k, k: v} for k, v in parts]}


def gradio_turn(text, files, reply):
    """One turn as Gradio 6's chatbot hands history to the handler."""
    content = [{"type": "file", "file": {"path": f}} for f in files]
    content += [{"type": "text", "text": text}] if text else []
    return [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]


# --------------------------------------------------------------------------------------------- the handler


def test_streams_the_models_answer(model, media):
    respond = make_respond(model, max_new_tokens=24)
    partial = list(respond({"text": QUESTION, "files": [media["image"]]}, []))
    want = model.chat([user(("image", media["image"]), ("text", "\n" + QUESTION))], max_new_tokens=24)
    assert want and partial[-1] == want
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))  # each yield extends the last
    if len(want.split()) > 1:
        assert len(partial) > 1  # streamed, not one final answer


def test_history_is_sent_and_failed_turns_left_out(model, media):
    respond = make_respond(model, max_new_tokens=16)
    first = model.chat([user(("image", media["image"]), ("audio", media["audio"]))], max_new_tokens=16)
    history = gradio_turn("", [media["image"], media["audio"]], first)
    history += gradio_turn("", [media["fake"]], f"{ERROR_MARK} notes.png: not an image file")
    got = list(respond({"text": "describe the image.", "files": []}, history))[-1]
    want = model.chat([user(("image", media["image"]), ("audio", media["audio"])),
                       {"role": "assistant", "content": first},
                       {"role": "user", "content": "describe the image."}], max_new_tokens=16)
    assert got == want


@pytest.mark.parametrize("key, words", [("fake", ["notes.png: not an image file"]),
                                        ("pdf", ["paper.pdf", ".pdf files are not supported"])])
def test_wrong_file_type_is_a_clear_reply(model, media, key, words):
    replies = list(make_respond(model)({"text": QUESTION, "files": [media[key]]}, []))
    assert len(replies) == 1 and replies[0].startswith(ERROR_MARK)
    assert all(w in replies[0] for w in words), replies[0]


def test_too_large_file_is_a_clear_reply(model, media):
    size = Path(media["big"]).stat().st_size
    replies = list(make_respond(model, max_upload_mb=1.5)({"text": QUESTION, "files": [media["big"]]}, []))
    assert replies == [f"{ERROR_MARK} big.png is {size / 2**20:.2f} MB, over the upload limit of 1.5 MB; "
                       "upload a smaller file"]
    assert list(make_respond(model, max_upload_mb=2, max_new_tokens=2)({"text": "", "files": [media["big"]]}, []))[0][
        :len(ERROR_MARK)] != ERROR_MARK  # under the limit it is taken


@pytest.mark.parametrize("message", [{"text": "", "files": []}, {"text": "  \n ", "files": []}, ""])
def test_empty_message_is_a_clear_reply(model, message):
    assert list(make_respond(model)(message, [])) == [
        f"{ERROR_MARK} The message is empty: type a question or upload an image or audio file."]


def test_input_error_text_is_shown(model, tmp_path):
    """More audio than the model takes (its limit is max_audio_seconds): the processor's InputError, shown."""
    long = tmp_path / "long.wav"
    seconds = model.config.max_audio_seconds + 1
    sf.write(long, np.zeros(int(seconds * 16000), dtype=np.float32), 16000)
    replies = list(make_respond(model)({"text": "transcribe the audio.", "files": [str(long)]}, []))
    assert replies == [f"{ERROR_MARK} long.wav: {seconds:.1f} s is longer than the limit of "
                       f"{model.config.max_audio_seconds:g} s"]


class ScriptedModel:
    """Streams a fixed reply word by word and keeps the messages it was given: the handler's side of folding."""

    config = SimpleNamespace(max_audio_seconds=30.0)

    def __init__(self, reply: str):
        self.reply, self.seen = reply, []

    def chat(self, messages, stream, max_new_tokens):
        self.seen.append(messages)
        for k, word in enumerate(self.reply.split(" ")):
            yield word if k == 0 else " " + word


def test_a_rationale_is_folded_above_the_answer(media):
    """"look first." replies ("i see ... answer: red") end as a folded rationale message and the answer; in the next
    turn the model gets its reply whole again; other replies stay one message."""
    reply = "i see a big red star at the top left. answer: red"
    model = ScriptedModel(reply)
    turns = list(make_respond(model)({"text": f"{QUESTION} look first.", "files": [media["image"]]}, []))
    assert turns[-2] == reply  # streamed as text first
    rationale, answer = turns[-1]
    assert rationale["content"] == "i see a big red star at the top left." and answer["content"] == "red"
    assert rationale["metadata"]["title"] == "rationale" and "metadata" not in answer
    history = gradio_turn(f"{QUESTION} look first.", [media["image"]], "")[:1] + turns[-1]
    model.reply = "blue"
    assert list(make_respond(model)({"text": "and the circle?", "files": []}, history)) == ["blue"]
    assert model.seen[-1][1] == {"role": "assistant", "content": reply}
    assert model.seen[-1][2] == {"role": "user", "content": "and the circle?"}


def test_demo_script_serves_on_loopback(model_dir):
    """`python demos/chat.py --model DIR --port P` serves the page on 127.0.0.1 until stopped."""
    import os
    import subprocess
    import sys
    import urllib.request

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(root / "demos" / "chat.py"), "--model", str(model_dir),
                             "--port", str(port), "--max-upload-mb", "2"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not serve within 60 s"
                time.sleep(0.2)
        assert "gradio" in page.lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
            assert json.loads(r.read())["max_file_size"] == 2 * 2**20  # Gradio refuses bigger uploads
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_parser_defaults_to_loopback():
    args = build_parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.max_upload_mb, args.share) == ("127.0.0.1", 7860, 10, False)


# --------------------------------------------------------------------------------------------- the browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(arg)
    # a fake microphone (a beep) that needs no permission prompt
    options.add_argument("--use-fake-device-for-media-stream")
    options.add_argument("--use-fake-ui-for-media-stream")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no selenium-manager download
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def bot_texts(driver) -> list[str]:
    """Texts of the assistant's messages on the page, in order."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#chatbot [data-testid=\"bot\"]')).map(e => e.textContent)")


def wait(driver, cond, timeout, what):
    """Poll `cond(driver)` until truthy (returned) or fail after `timeout` seconds, showing the chat."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond)
    except TimeoutException:
        html = driver.execute_script("return document.querySelector('#chat-input').outerHTML")
        pytest.fail(f"timed out after {timeout} s waiting for {what}; bot messages: {bot_texts(driver)!r} {html}")


def input_ready(driver) -> bool:
    """The chat input is back (enabled) after the last reply."""
    return driver.execute_script("const t = document.querySelector('#chat-input textarea'); "
                                 "return t !== null && !t.disabled")


def toasts(driver) -> list[str]:
    """Texts of Gradio's notification toasts."""
    return driver.execute_script("return Array.from(document.querySelectorAll('[data-testid=\"toast-body\"], "
                                 ".toast-body')).map(e => e.textContent)")


def send(driver, files=(), text="", wait_upload=True):
    """Attach files to the chat input, type text, submit, and return how many bot messages there were before."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(bot_texts(driver))
    box = driver.find_element(By.CSS_SELECTOR, "#chat-input")
    wait(driver, input_ready, 30, "the chat input to take input")
    if files:
        picker = box.find_element(By.CSS_SELECTOR, "input[type=file]")
        driver.execute_script("arguments[0].value = ''", picker)  # else chromedriver adds to the last files
        picker.send_keys("\n".join(files))
        if not wait_upload:
            return before
        wait(driver, lambda d: len(box.find_elements(By.CSS_SELECTOR, ".thumbnail-item")) == len(files)
             and not box.find_elements(By.CSS_SELECTOR, ".loading, .uploading"), 20, f"upload of {files}")
    area = box.find_element(By.CSS_SELECTOR, "textarea")
    area.send_keys(text)
    area.send_keys(Keys.ENTER)
    return before


def reply_after(driver, before, want, timeout=30):
    """Wait for a new bot message that reads `want` (whitespace as the page shows it) and return its text."""
    norm = " ".join(want.split())
    wait(driver, lambda d: len(bot_texts(d)) > before and " ".join(bot_texts(d)[-1].split()) == norm, timeout,
         f"the reply {norm!r}")
    return bot_texts(driver)[-1]


class Recorder:
    """The model, noting the messages of each chat (to find where the server put a microphone recording)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):  # everything else is the model's
        return getattr(self.model, name)

    def chat(self, messages, **kwargs):
        self.calls.append(messages)
        return self.model.chat(messages, **kwargs)


def test_browser_chat(model_dir, model, media, browser):
    """A bundled example; (cleared) image + spoken question, a too-large and a bad upload, a follow-up; (cleared) a
    microphone recording: the page shows model.chat's answers, and the server keeps serving."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    port = free_port()
    served = Recorder(FusionModel.from_pretrained(model_dir).eval())
    demo = launch(served, port=port, max_upload_mb=1, max_new_tokens=32, block=False)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait(browser, lambda d: d.execute_script("return !!document.querySelector('#chat-input textarea')"), 30,
             "the chat input")

        # a bundled example, clicked; then a new conversation
        browser.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label^='Select example 1']").click()
        scene = str(EXAMPLES_DIR / "scene.png")
        reply_after(browser, 0, model.chat([user(("image", scene), ("text", "\n" + QUESTION))], max_new_tokens=32))
        wait(browser, input_ready, 30, "the chat input to take input")
        browser.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label='Clear']").click()
        wait(browser, lambda d: not bot_texts(d), 10, "the chat to clear")

        first = model.chat([user(("image", media["image"]), ("audio", media["audio"]))], max_new_tokens=32)
        assert first.strip()
        before = send(browser, [media["image"], media["audio"]])
        reply_after(browser, before, first)

        send(browser, [media["big"]], wait_upload=False)  # over max_file_size: Gradio refuses it in the page
        wait(browser, lambda d: any("exceed" in t and "big.png" in t for t in toasts(d)), 10, "the too-large toast")

        before = send(browser, [media["fake"]], QUESTION)
        wait(browser, lambda d: len(bot_texts(d)) > before and "notes.png: not an image file" in bot_texts(d)[-1],
             30, "the bad-upload reply")

        follow = model.chat([user(("image", media["image"]), ("audio", media["audio"])),
                             {"role": "assistant", "content": first},
                             {"role": "user", "content": "describe the image."}], max_new_tokens=32)
        before = send(browser, text="describe the image.")
        reply_after(browser, before, follow)  # the server still serves, with the history, without the bad turn

        wait(browser, input_ready, 30, "the chat input to take input")
        browser.find_element(By.CSS_SELECTOR, "#chatbot button[aria-label='Clear']").click()
        wait(browser, lambda d: not bot_texts(d), 10, "the chat to clear")
        browser.find_element(By.CSS_SELECTOR, "#chat-input [data-testid='microphone-button']").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input select option"), 10, "the microphones")
        browser.find_element(By.CSS_SELECTOR, "#chat-input button[aria-label='Start recording']").click()
        wait(browser, lambda d: d.execute_script("const t = document.querySelector('#chat-input .timestamp');"
                                                 "return t !== null && t.textContent.trim() >= '0:01'"), 10,
             "a second of recording")  # of the fake microphone's beep
        browser.find_element(By.CSS_SELECTOR, "#chat-input button[aria-label='Stop recording']").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-input button[aria-label='Attach audio']"),
             10, "the recording")[0].click()
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-input .thumbnail-item")) == 1, 10,
             "the recording attached")
        area = browser.find_element(By.CSS_SELECTOR, "#chat-input textarea")
        calls = len(served.calls)
        area.send_keys("transcribe the audio.")
        area.send_keys(Keys.ENTER)
        wait(browser, lambda d: len(served.calls) == calls + 1 and bot_texts(d), 30, "the microphone turn")
        recording = served.calls[-1][-1]["content"][0]["audio"]  # where the server keeps the upload
        assert 0.5 < sf.info(recording).duration < 10, recording  # a real recording, readable, about 1 s
        asked = [user(("audio", recording), ("text", "\ntranscribe the audio."))]
        assert served.calls[-1] == asked  # cleared: no earlier turns
        reply_after(browser, 0, model.chat(asked, max_new_tokens=32) or EMPTY_REPLY)  # a beep is no speech
    finally:
        demo.close()
    with pytest.raises(OSError):  # stopped: nothing listens on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_fifty_turns_in_the_browser(model_dir, model, media, browser):
    """50 turns typed into the page (issue 24, item 8), an image with every fifth: each turn is answered, none with an
    error, from the newest turns that fit the 1024-token window (the oldest go first), and the page shows exactly the
    model's answer to what the server gave it."""
    port = free_port()
    served = Recorder(FusionModel.from_pretrained(model_dir).eval())
    demo = launch(served, port=port, max_upload_mb=1, max_new_tokens=16, block=False)
    window, processor = model.config.text.max_position_embeddings, model.processor()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait(browser, lambda d: d.execute_script("return !!document.querySelector('#chat-input textarea')"), 30,
             "the chat input")
        for turn in range(50):
            before = send(browser, [media["image"]] if turn % 5 == 0 else [],
                          "describe the image." if turn % 2 == 0 else QUESTION)
            wait(browser, lambda d: len(served.calls) == turn + 1, 60, f"turn {turn + 1} at the model")
            given = served.calls[-1]
            assert processor(given)["input_ids"].shape[1] + 16 <= window, turn
            assert given[-1]["role"] == "user" and len(given) % 2 == 1 and len(given) <= 2 * turn + 1
            reply_after(browser, before, model.chat(given, max_new_tokens=16) or EMPTY_REPLY, timeout=60)
        assert len(served.calls[-1]) < 2 * 49 + 1  # the oldest turns were dropped
        shown = bot_texts(browser)
        assert len(shown) == 50 and not [t for t in shown if t.strip().startswith(ERROR_MARK)]
    finally:
        demo.close()


def test_fifty_turns_stay_in_the_context_window(model):
    """50 turns about an image, far past the 1024-token window: every turn is answered, from the newest turns that fit
    (the answer to turn 50 is the model's answer to the conversation cut by fit_context), never an error."""
    from mm.apps.chat import fit_context, history_to_messages, user_content

    scene = str(EXAMPLES_DIR / "scene.png")
    respond = make_respond(model, max_new_tokens=16)
    history = []
    for turn in range(50):
        message = {"text": "what colour is the star?" if turn % 2 else "describe the image.", "files": [scene]}
        reply = list(respond(message, history))[-1]
        assert not reply.startswith(ERROR_MARK), (turn, reply)
        history += [{"role": "user", "content": message["text"]}, {"role": "user", "content": {"path": scene}},
                    {"role": "assistant", "content": reply}]
    messages = history_to_messages(history[:-3]) + [{"role": "user", "content": user_content(message["text"], [scene])}]
    kept = fit_context(model, messages, 16)
    window = model.config.text.max_position_embeddings
    assert 1 < len(kept) < len(messages) and kept == messages[len(messages) - len(kept):]
    assert model.processor()(kept)["input_ids"].shape[1] + 16 <= window < model.processor()(messages[-len(kept) - 2:])[
        "input_ids"].shape[1] + 16  # as many turns as fit, and not one more
    assert reply == model.chat(kept, max_new_tokens=16)


def test_the_upload_cache_is_cleaned(model):
    """Gradio keeps every upload in its cache; the app has it deleted hourly once a day old (and at each restart)."""
    from mm.apps.chat import UPLOAD_CACHE, build_demo

    assert build_demo(model).delete_cache == UPLOAD_CACHE == (3600, 86400)
