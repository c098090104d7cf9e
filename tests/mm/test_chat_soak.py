"""A soak of the browser chat server: REQUESTS requests, CONCURRENCY at a time, against the real Gradio app
(`mm.apps.chat.launch`) serving the shipped model on 127.0.0.1 in this process, from CONCURRENCY client processes
(Gradio's own client, and plain HTTP).

Half the requests are good (a question about an image, a description, a transcript, a spoken question, text) and
half hostile: an audio bomb (a 330 KB FLAC of 30 minutes of 48 kHz stereo silence), a pixel bomb (a 12 KB PNG of
10000x10000 pixels), a truncated PNG, text named .wav, an empty .wav, 31 s of audio, a PDF, a 100 kB
prompt, an empty message, uploads over the size limit, and a request naming a file on the server's disk.

Asserted: every good request gets the model's own answer (`model.chat` on the same messages; greedy decoding is
deterministic), every hostile one its clear message, the server's process does not leak, and the server still answers
at the end. A leak grows the process in every round: after a warm-up round the requests come in two rounds, the
resident memory is read after each (with what the allocator holds free handed back first, `malloc_trim`), and at least
one of the two rounds must grow it by less than RSS_GROWTH_MB (a one-time step of the allocator or a cache shows in
one round only; on this machine a single reading of 200 requests varied from +20 to +121 MB without trimming). Every
request opens a new session, and the server keeps the state of the last SESSIONS, a number the warm-up passes.
The figures are printed (pytest -s shows them).
"""
import ctypes
import gc
import multiprocessing
import random
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import mm
from mm.apps.chat import EMPTY_REPLY, ERROR_MARK, launch
from mm.assets import example

REQUESTS, CONCURRENCY, MAX_NEW_TOKENS = 200, 8, 8  # REQUESTS in two rounds
WARMUP = 100  # requests before the RSS is first read
UPLOAD_MB = 1  # the server's upload limit (small, so that uploads over it are small too)
RSS_GROWTH_MB = 50  # per round of REQUESTS / 2
SESSIONS = 50  # sessions whose state the server keeps: reached in the warm-up, so that kept state stops growing
AUDIO_FORMATS = ".wav, .flac, .ogg, .mp3, .m4a, .webm, .opus"
IMAGE_FORMATS = ".png, .jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    """Resident memory of this process (the server's: it runs in this process) in MB, read after a garbage collection
    and after glibc's malloc hands the free memory of its arenas back to the system (`malloc_trim(0)`)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The hostile uploads, each named for what is wrong with it."""
    d = tmp_path_factory.mktemp("soak")
    with sf.SoundFile(d / "bomb.flac", "w", 48000, 2, "PCM_16") as f:  # 30 minutes of stereo silence in ~330 KB
        for _ in range(30):
            f.write(np.zeros((60 * 48000, 2), np.int16))
    Image.new("1", (10000, 10000)).save(d / "pixels.png")  # 10^8 pixels in ~12 KB
    Image.new("RGB", (40, 30), "red").save(d / "ok.png")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:60])
    (d / "notes.wav").write_text("not audio")
    (d / "empty.wav").write_bytes(b"")
    sf.write(d / "long.wav", np.zeros(31 * 16000, np.int16), 16000)  # 0.95 MB: under the upload limit
    for mb in (2, 50):  # over the upload limit (sparse files, streamed from disk)
        with open(d / f"{mb}mb.png", "wb") as f:
            f.truncate(mb * 2**20)
    (d / "paper.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n")
    assert (d / "bomb.flac").stat().st_size < 400_000 and (d / "pixels.png").stat().st_size < 20_000
    return d


def kinds(files):
    """{kind: (message, the reply it must get)}: a reply None is the model's own answer (a good request)."""
    scene, question = str(example("scene.png")), str(example("question.wav"))
    long_text = ("red " * 25_000).strip()  # the chat strips the text
    too_large = f"413 File size exceeded maximum allowed size of {UPLOAD_MB * 2**20} bytes."  # Gradio's upload route

    def refused(name, why):
        return f"{ERROR_MARK} {name}: {why}"

    return {
        # good
        "image question": ({"text": "what colour is the star?", "files": [scene]}, None),
        "description": ({"text": "describe the image.", "files": [scene]}, None),
        "transcript": ({"text": "transcribe the audio.", "files": [question]}, None),
        "spoken question": ({"text": "", "files": [scene, question]}, None),
        "text": ({"text": "hello", "files": []}, None),
        "image alone": ({"text": "", "files": [scene]}, None),
        # hostile
        "audio bomb": ({"text": "transcribe the audio.", "files": [str(files / "bomb.flac")]},
                       refused("bomb.flac", "1800.0 s is longer than the limit of 30 s")),
        "pixel bomb": ({"text": "describe the image.", "files": [str(files / "pixels.png")]},
                       refused("pixels.png", "100000000 pixels exceeds the limit of 89478485 pixels "
                               "(PIL.Image.MAX_IMAGE_PIXELS; possible decompression bomb)")),
        "truncated image": ({"text": "describe the image.", "files": [str(files / "truncated.png")]},
                            refused("truncated.png", "corrupt or truncated PNG image: image file is truncated")),
        "text named .wav": ({"text": "transcribe the audio.", "files": [str(files / "notes.wav")]},
                            refused("notes.wav", "not a readable audio file (libsndfile: Error opening "
                                    "'notes.wav': Format not recognised.)")),
        "empty audio": ({"text": "transcribe the audio.", "files": [str(files / "empty.wav")]},
                        refused("empty.wav", "empty file (0 bytes)")),
        "31 s of audio": ({"text": "transcribe the audio.", "files": [str(files / "long.wav")]},
                          refused("long.wav", "31.0 s is longer than the limit of 30 s")),
        "pdf": ({"text": "summarize this.", "files": [str(files / "paper.pdf")]},
                refused("paper.pdf", f".pdf files are not supported; upload an image ({IMAGE_FORMATS}) or audio "
                        f"({AUDIO_FORMATS})")),
        "100 kB of text": ({"text": long_text, "files": []}, ValueError),  # the library's message
        "empty message": ({"text": "  ", "files": []},
                          f"{ERROR_MARK} The message is empty: type a question or upload an image or audio file."),
        "upload of 2 MB": (files / "2mb.png", too_large),
        "upload of 50 MB": (files / "50mb.png", too_large),
        "a file on the server": ("/etc/passwd", "error"),
    }


def schedule(table: dict, n: int, seed: int) -> list[str]:
    """n request kinds in a shuffled order, half good and half hostile, each kind about equally often."""
    good = [k for k, (_, reply) in table.items() if reply is None]
    bad = [k for k in table if k not in good]
    kinds = [good[i // 2 % len(good)] if i % 2 == 0 else bad[i // 2 % len(bad)] for i in range(n)]
    random.Random(seed).shuffle(kinds)
    return kinds


def as_messages(message: dict) -> list[dict]:
    """A chat-box message {"text", "files"} as the model's one user message: images, audio, then "\\n" + text."""
    content = [{"type": "image", "image": f} for f in message["files"] if f.endswith(".png")]
    content += [{"type": "audio", "audio": f} for f in message["files"] if f.endswith(".wav")]
    if not content:
        return [{"role": "user", "content": message["text"]}]
    text = [{"type": "text", "text": "\n" + message["text"]}] if message["text"] else []
    return [{"role": "user", "content": content + text}]


_client = None  # a client process's Gradio client


def ask(url: str, kind: str, message) -> tuple[str, str]:
    """(kind, what the server answered) for one request, sent from a client process (so that this process, the
    server's, holds no client): a chat message in a new session (an empty chat), an upload from disk, or a path."""
    global _client
    from gradio_client import Client, handle_file

    if isinstance(message, Path):  # an upload over the limit, refused by the upload route
        with open(message, "rb") as f:
            r = httpx.post(f"{url}/gradio_api/upload", files=[("files", (message.name, f))], timeout=60)
        return kind, f"{r.status_code} {r.text}"
    if isinstance(message, str):  # a path on the server's disk, never uploaded: refused, nothing read
        call = f"{url}/gradio_api/call/respond"
        files = [{"path": message, "meta": {"_type": "gradio.FileData"}}]
        event = httpx.post(call, json={"data": [{"text": "x", "files": files}]}, timeout=30).json()
        stream = httpx.get(f"{call}/{event['event_id']}", timeout=60).text
        return kind, "error" if stream.startswith("event: error") and "root:" not in stream else stream
    if _client is None:
        _client = Client(url + "/", verbose=False)
    _client.reset_session()
    upload = {"text": message["text"], "files": [handle_file(f) for f in message["files"]]}
    return kind, _client.predict(upload, api_name="/respond")


def test_chat_server_soak(files, capsys):
    model = mm.load()
    table = kinds(files)
    want = {}
    for kind, (message, reply) in table.items():  # the model's own answers and errors, before the server exists
        if reply is None:
            want[kind] = model.chat(as_messages(message), max_new_tokens=MAX_NEW_TOKENS).strip() or EMPTY_REPLY
            assert not want[kind].startswith(ERROR_MARK)
        elif reply is ValueError:
            with pytest.raises(ValueError, match=r"^prompt of \d+ tokens exceeds the context window of 1024") as e:
                model.chat(as_messages(message), max_new_tokens=MAX_NEW_TOKENS)
            want[kind] = f"{ERROR_MARK} {e.value}"
        else:
            want[kind] = reply

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    demo = launch(model, port=port, max_upload_mb=UPLOAD_MB, max_new_tokens=MAX_NEW_TOKENS, block=False,
                  max_sessions=SESSIONS)
    pool = ProcessPoolExecutor(CONCURRENCY, mp_context=multiprocessing.get_context("spawn"))  # 8 users
    try:
        def run(batch: list[str]) -> list[tuple[str, str]]:
            return list(pool.map(partial(ask, url), batch, [table[kind][0] for kind in batch]))

        warmup = run(schedule(table, WARMUP, seed=1))  # Gradio's, the allocator's and torch's caches filled
        rss = [rss_mb()]
        batch = schedule(table, REQUESTS, seed=0)
        start = time.monotonic()
        answers = []
        for half in (batch[:REQUESTS // 2], batch[REQUESTS // 2:]):
            answers += run(half)
            rss.append(rss_mb())
        seconds = time.monotonic() - start
        last = ask(url, "image question", table["image question"][0])
    finally:
        pool.shutdown()
        demo.close()

    wrong = [(kind, got) for kind, got in warmup + answers + [last] if got != want[kind]]
    good = sum(table[k][1] is None for k in batch)
    with capsys.disabled():
        print(f"\nchat soak: after {WARMUP} requests, {REQUESTS} requests ({good} good, {REQUESTS - good} hostile), "
              f"{CONCURRENCY} at a time, {len(wrong)} wrong, {seconds:.1f} s; "
              f"RSS {' -> '.join(f'{r:.0f}' for r in rss)} MB "
              f"({', '.join(f'{b - a:+.1f}' for a, b in zip(rss, rss[1:]))} MB a round)")
    assert not wrong, wrong[:5]
    assert min(b - a for a, b in zip(rss, rss[1:])) < RSS_GROWTH_MB, rss
