"""`mm serve`: OpenAI-style replies equal `model.chat` (text, image, audio), streamed or not, batched or not."""
import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

import mm
from mm.apps.chat import ERROR_MARK, make_respond
from mm.apps.serve import ChatServer, create_app
from mm.apps.serve_client import ServerClient

EXAMPLES = Path(mm.__file__).parent / "examples"
IMAGE, AUDIO = EXAMPLES / "scene.png", EXAMPLES / "question.wav"
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()}}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": base64.b64encode(AUDIO.read_bytes()).decode(), "format": "wav"}}

# (OpenAI content, the same content as model.chat takes it)
TOLD = "there are two shapes: a big red circle at the top and a small blue star at the bottom.\nwhere is the star?"
CASES = {  # text: a scene told in words (what the shipped model reads without an image; it ends at once on others)
    "text": (TOLD, TOLD),
    "image": ([IMAGE_URL, {"type": "text", "text": "\ndescribe the image."}],
              [{"type": "image", "image": str(IMAGE)}, {"type": "text", "text": "\ndescribe the image."}]),
    "image+audio": ([IMAGE_URL, AUDIO_PART], [{"type": "image", "image": str(IMAGE)}, {"type": "audio", "audio": str(AUDIO)}]),
    "audio": ([AUDIO_PART, {"type": "text", "text": "\ntranscribe the audio."}],
              [{"type": "audio", "audio": str(AUDIO)}, {"type": "text", "text": "\ntranscribe the audio."}]),
}


@pytest.fixture(scope="module")
def model(one_thread):
    return mm.load()


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(ChatServer(model, "tiny", max_batch=4), max_body_bytes=2**20)) as c:
        yield c


def ask(content, **kw):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 48, **kw}


def sse_events(text: str) -> list:
    lines = [ln for ln in text.split("\n\n") if ln.strip()]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


@pytest.mark.parametrize("case", list(CASES))
def test_reply_equals_model_chat_streamed_or_not(client, model, case):
    content, ours = CASES[case]
    want = model.chat([{"role": "user", "content": ours}], max_new_tokens=48)
    r = client.post("/v1/chat/completions", json=ask(content))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": want}
    assert choice["finish_reason"] in ("stop", "length") and want
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] == model.processor()([{"role": "user", "content": ours}])["input_ids"].shape[1]

    r = client.post("/v1/chat/completions", json=ask(content, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(pieces) == want
    assert pieces == ["", *model.chat([{"role": "user", "content": ours}], stream=True, max_new_tokens=48), ""]


def test_max_tokens_ends_with_length(client, model):
    r = client.post("/v1/chat/completions", json=ask(CASES["image"][0], max_tokens=3)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    want = model.chat([{"role": "user", "content": CASES["image"][1]}], max_new_tokens=3)
    assert r["choices"][0]["message"]["content"] == want


def test_seeded_sampling_reproduces(client):
    body = ask(CASES["image"][0], temperature=1.5, top_k=50, seed=3)
    a, b = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    greedy = client.post("/v1/chat/completions", json=ask(CASES["image"][0])).json()
    others = {client.post("/v1/chat/completions", json={**body, "seed": s}).json()["choices"][0]["message"]["content"]
              for s in range(4, 8)}
    assert others | {greedy["choices"][0]["message"]["content"]} != {a["choices"][0]["message"]["content"]}


def test_models_lists_the_model(client):
    r = client.get("/v1/models").json()
    assert r["object"] == "list" and [m["id"] for m in r["data"]] == ["tiny"] and r["data"][0]["object"] == "model"


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps(ask([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}])).encode(), 400, "data URL"),
    (json.dumps(ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])).encode(), 400, "image 0"),
    (json.dumps(ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}])).encode(), 400, "base64"),
    (json.dumps(ask([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}])).encode(), 400, "audio 0"),
    (json.dumps(ask([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}])).encode(), 400, "format"),
    (json.dumps(ask([{"type": "video", "video": 1}])).encode(), 400, "type text, image_url or input_audio"),
    (json.dumps(ask("word " * 600)).encode(), 400, "context window of 1024"),
    (json.dumps(ask("hi", max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps(ask("hi", temperature=-1)).encode(), 400, "temperature"),
    (json.dumps(ask("hi", n=2)).encode(), 400, "n: only one"),
    (b"{" + b" " * 2**20 + b"}", 413, "limit of 1048576 bytes"),
])
def test_bad_requests_get_clear_errors(client, body, status, words):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/chat/completions", json=ask("hi", max_tokens=2)).status_code == 200  # still serving


@pytest.fixture(scope="module")
def live(model):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread: (its ChatServer, its URL)."""
    server = ChatServer(model, "tiny", max_batch=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(30)


def test_real_server_on_localhost_batches_concurrent_clients(model, live):
    server, url = live
    cases = [CASES[k] for k in ("text", "image", "image+audio", "audio")] * 2
    wants = [model.chat([{"role": "user", "content": ours}], max_new_tokens=48) for _, ours in cases]
    steps_before = server.engine.steps
    with httpx.Client(base_url=url, timeout=120) as http, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda c: http.post("/v1/chat/completions", json=ask(c[0])).json(), cases))
    got = [r["choices"][0]["message"]["content"] for r in replies]
    assert got == wants
    n_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    # fewer decode steps than tokens: requests shared steps (each request's first token comes from its prefill)
    assert server.engine.steps - steps_before < n_tokens - len(cases)


@pytest.mark.parametrize("case", ["text", "image+audio", "audio"])
def test_client_and_gradio_chat_through_the_server_reply_as_the_model(model, live, case):
    client = ServerClient(live[1])
    assert client.name == "tiny" and client.config.max_audio_seconds == model.config.max_audio_seconds
    messages = [{"role": "user", "content": CASES[case][1]}]
    want = model.chat(messages, max_new_tokens=48)
    assert client.chat(messages, max_new_tokens=48) == want
    assert list(client.chat(messages, stream=True, max_new_tokens=48)) == list(model.chat(messages, stream=True,
                                                                                           max_new_tokens=48))
    files = [p["image"] if p["type"] == "image" else p["audio"] for p in CASES[case][1] if p["type"] != "text"] \
        if isinstance(CASES[case][1], list) else []
    ours = CASES[case][1]
    text = ours if isinstance(ours, str) else "".join(p.get("text", "") for p in ours).strip()
    via_server = list(make_respond(client, max_new_tokens=48)({"text": text, "files": files}, []))[-1]
    assert via_server and not via_server.startswith(ERROR_MARK)
    assert via_server == list(make_respond(model, max_new_tokens=48)({"text": text, "files": files}, []))[-1]
    with pytest.raises(ValueError, match="400.*context window of 1024"):
        client.chat([{"role": "user", "content": "word " * 600}])
    assert list(make_respond(client)({"text": "word " * 600, "files": []}, []))[-1].startswith(ERROR_MARK)
