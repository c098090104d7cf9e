"""The chat server's bounds (issue 24): Gradio's queue holds at most `max_queue` waiting requests (one more is refused
at once with Gradio's "Queue is full", HTTP 503, never left hanging) and its session store at most `max_sessions`
sessions; the defaults are MAX_QUEUE and MAX_SESSIONS, changed with `mm chat --max-queue / --max-sessions`. Uploads
leave Gradio's cache, and an upload that runs the server out of memory is a reply of its own."""
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf

from mm.apps.chat import MAX_QUEUE, MAX_SESSIONS, build_parser, launch
from mm.apps.cli import main


class GatedModel:
    """A chat model whose streamed answer "ok" waits until `gate` is set; `entered` is set once a chat has begun."""

    config = SimpleNamespace(max_audio_seconds=1.0, max_position_embeddings=4096)
    modalities = ("image", "speech")

    def __init__(self):
        self.gate, self.entered = threading.Event(), threading.Event()

    def chat(self, messages, stream=False, max_new_tokens=64):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return iter(["ok"])

    def caption(self, image):
        return "a red star"

    def transcribe(self, audio):
        return "hello"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(url: str, text: str) -> httpx.Response:
    """Put one chat message in the server's queue (Gradio's /call route); the response holds its event id."""
    return httpx.post(f"{url}/gradio_api/call/respond", json={"data": [{"text": text, "files": []}]}, timeout=30)


def answer(url: str, event_id: str) -> str:
    """The event stream of one queued request, read to its end."""
    return httpx.get(f"{url}/gradio_api/call/respond/{event_id}", timeout=60).text


DONE = 'event: complete\ndata: ["ok", null]\n\n'  # the answer, complete


def test_the_defaults_reach_gradio():
    assert (MAX_QUEUE, MAX_SESSIONS) == (32, 500)
    args = build_parser().parse_args([])
    assert (args.max_queue, args.max_sessions) == (MAX_QUEUE, MAX_SESSIONS)
    demo = launch(GatedModel(), port=free_port(), block=False)
    try:
        assert demo._queue.max_size == MAX_QUEUE
        assert demo.state_holder.capacity == MAX_SESSIONS
    finally:
        demo.close()


def test_a_full_queue_refuses_at_once_and_the_server_keeps_serving():
    model, port = GatedModel(), free_port()
    url = f"http://127.0.0.1:{port}"
    demo = launch(model, port=port, block=False, max_queue=2, max_sessions=3)
    try:
        first = join(url, "one")
        assert first.status_code == 200, first.text
        assert model.entered.wait(30)  # taken out of the queue: the model holds it
        waiting = [join(url, t) for t in ("two", "three")]
        assert [r.status_code for r in waiting] == [200, 200]
        start = time.monotonic()
        refused = join(url, "four")
        assert (refused.status_code, refused.json()) == (503, {"detail": "Queue is full. Max size is 2 and size is 2."})
        assert time.monotonic() - start < 5  # refused, not held
        model.gate.set()
        for r in [first] + waiting:
            assert answer(url, r.json()["event_id"]).endswith(DONE)
        later = join(url, "five")  # room again
        assert answer(url, later.json()["event_id"]).endswith(DONE)
        assert len(demo.state_holder.session_data) == 3  # 5 sessions asked, the oldest dropped (500 keep 5)
    finally:
        model.gate.set()
        demo.close()


@pytest.mark.parametrize("argv,message", [
    (["chat", "--max-queue", "0"], "mm chat: error: --max-queue must be >= 1, got 0"),
    (["chat", "--max-sessions", "-1"], "mm chat: error: --max-sessions must be >= 1, got -1"),
])
def test_bounds_below_one_are_refused(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_an_upload_that_runs_out_of_memory_is_a_clear_reply(tmp_path, monkeypatch):
    """MemoryError while an upload is checked (issue 24, item 6) is the upload's reply, not a failed request."""
    from mm.apps import chat

    path = tmp_path / "big.flac"
    sf.write(path, np.zeros(1600, np.float32), 16000)

    def load_audio(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(chat, "load_audio", load_audio)
    respond = chat.make_respond(GatedModel())
    assert list(respond({"text": "transcribe the audio.", "files": [str(path)]}, [])) == [
        f"{chat.ERROR_MARK} big.flac: too large to decode in this server's memory; upload a smaller file"]


def test_uploads_leave_the_cache_when_the_server_stops(tmp_path):
    """Gradio copies every upload into its cache; the app has them deleted (hourly once a day old, all at a stop)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "scene.png").write_bytes(b"not really a png")
    demo = launch(GatedModel(), port=port, block=False)
    try:
        with open(tmp_path / "scene.png", "rb") as f:
            r = httpx.post(f"{url}/gradio_api/upload", files=[("files", ("scene.png", f))], timeout=30)
        (cached,) = r.json()
        assert Path(cached).read_bytes() == b"not really a png" and cached in demo.upload_file_set
    finally:
        demo.close()
    assert not Path(cached).exists()
