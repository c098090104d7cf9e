"""A Gradio chat with the multimodal model: text, image and audio uploads, a microphone, streamed answers.

`build_demo(model)` returns the `gr.Blocks` app; `launch(...)` serves it (127.0.0.1 by default); `run_chat(argv)` is
`mm chat [--model DIR] [--host H] [--port P] [--max-upload-mb MB]`.

Each user turn becomes one message of the model's format, media first (images, then audio) and the text after a
newline, as the model was trained: "<image>\\nwhat colour is the star?", "<image><audio>" (a spoken question),
"<audio>\\ntranscribe the audio.". Earlier turns go with their media. A turn that fails (empty, a file too large,
of the wrong type, unreadable, more than the model takes) gets an assistant reply starting with `ERROR_MARK` that
says why; such turns are left out of the conversation the model sees, and the server keeps serving.

A question asked with "look first." (`COT_INSTRUCTION`) is answered with the rationale first ("i see a big red star
at the top left. answer: red", Multimodal-CoT); the chat shows that rationale folded above the answer, and gives the
model the reply whole again in later turns.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Iterator

from encoders.audio import AudioError, load_audio
from encoders.image import ImageError, load_image

from mm.apps.agent_tab import ERROR_MARK
from mm.apps.options import check_port
from mm.data.scenes import COT_INSTRUCTION, join_cot, split_cot


EMPTY_REPLY = "(the model gave an empty answer)"
MB = 2**20  # bytes in the MB of upload limits, as Gradio counts them
MALLOC_ARENAS = 2  # glibc malloc arenas of a chat server process (limit_malloc_arenas)
UPLOAD_CACHE = (3600, 86400)  # every hour, delete uploads older than a day (and all of them at a restart)
MAX_QUEUE = 32  # requests waiting for the model; one more gets Gradio's "Queue is full" (HTTP 503) at once
MAX_SESSIONS = 500  # sessions whose state Gradio keeps (~70 KB each + the chat), the least recently used dropped
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".webm", ".opus")
TITLE = "mm chat"
DESCRIPTION = ("Ask about an image (upload it and type a question, or record the question with the microphone), "
               "ask for a description (\"describe the image.\") or a transcript (\"transcribe the audio.\"). "
               f"End a question with \"{COT_INSTRUCTION}\" to see the model's rationale before its answer.")

RATIONALE_TITLE = "rationale"  # the folded message above an answer given with its rationale
EXAMPLE_LABELS = ["what colour is the star?", "a spoken question about the image", "describe the image.",
                  "transcribe the audio.", f"what colour is the star? {COT_INSTRUCTION}"]

log = logging.getLogger(__name__)


def file_kind(path: str | os.PathLike) -> str | None:
    """"image", "audio" or None (not a type the model takes), from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "audio" if suffix in AUDIO_SUFFIXES else None


def user_content(text: str, files: list[str]) -> list[dict] | str:
    """One user turn in the model's format: images, then audio, then "\\n" + text (just the text without media)."""
    parts = [{"type": k, k: f} for k in ("image", "audio") for f in files if file_kind(f) == k]
    text = text.strip()
    if not parts:
        return text
    if text:
        parts.append({"type": "text", "text": "\n" + text})
    return parts


def _message_text_and_files(message: dict) -> tuple[str, list[str]]:
    """(text, file paths) of one Gradio history message (content a string, a file dict, or a list of them)."""
    content = message.get("content")
    items = content if isinstance(content, (list, tuple)) else [content]
    text, files = "", []
    for item in items:
        if isinstance(item, str):
            text += item
        elif isinstance(item, dict) and item.get("type") == "text":
            text += item.get("text", "")
        elif isinstance(item, dict) and item.get("type") == "file":
            files.append(item["file"]["path"])
        elif isinstance(item, dict) and "path" in item:
            files.append(item["path"])
    return text, files


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio's chat history -> the model's messages, leaving out failed turns (replies starting with ERROR_MARK);
    a folded rationale and the answer after it become one reply again ("<rationale> answer: <answer>")."""
    out: list[dict] = []
    pending: list[dict] = []  # user messages of the turn not yet answered
    rationale = ""
    for m in history:
        text, files = _message_text_and_files(m)
        if m.get("role") == "user":
            pending.append({"text": text, "files": files})
        elif m.get("role") == "assistant":
            if (m.get("metadata") or {}).get("title") == RATIONALE_TITLE:
                rationale = text.strip()
                continue
            if text.strip().startswith(ERROR_MARK) or not pending:
                pending, rationale = [], ""
                continue
            reply = "" if text.strip() == EMPTY_REPLY else text.strip()
            if rationale:
                reply, rationale = join_cot(rationale, reply), ""
            t = "\n".join(p["text"] for p in pending if p["text"].strip())
            out.append({"role": "user", "content": user_content(t, [f for p in pending for f in p["files"]])})
            out.append({"role": "assistant", "content": reply})
            pending = []
    return out


def fold_rationale(reply: str) -> str | list[dict]:
    """A reply with its rationale first -> two assistant messages, the rationale folded (a Gradio thought) above
    the answer; any other reply as it is."""
    rationale, answer = split_cot(reply)
    if not rationale:
        return reply
    return [{"role": "assistant", "content": rationale, "metadata": {"title": RATIONALE_TITLE, "status": "done"}},
            {"role": "assistant", "content": answer or EMPTY_REPLY}]


def fit_context(model, messages: list[dict], max_new_tokens: int) -> list[dict]:
    """The conversation cut to fit the context window with room for the reply: the oldest turns (a user message and
    the answer to it, with their images and audio) go first; the newest message always stays (if it alone is too long,
    the model says so). Found by bisection over how many turns to drop, each try one pass of the processor."""
    window = model.config.text.max_position_embeddings
    processor = model.processor()

    def fits(k: int) -> bool:  # k: turns dropped
        return processor(messages[2 * k:])["input_ids"].shape[1] + max_new_tokens <= window

    lo, hi = 0, (len(messages) - 1) // 2  # dropping hi turns leaves the newest message alone
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return messages[2 * lo:]


def upload_names(text: str, paths: list[str]) -> str:
    """`text` with each upload's server cache path replaced by the upload's own name."""
    for p in paths:
        text = text.replace(p, Path(p).name)
    return text


def check_file(path: str, max_upload_mb: float, max_audio_seconds: float | None = None) -> str | None:
    """Why the uploaded file cannot be used (too large, wrong type, unreadable, audio too long), or None if it can.
    Audio is decoded no further than `max_audio_seconds`: a small compressed file may hold hours of audio."""
    name = Path(path).name
    if not Path(path).is_file():
        return f"{name}: the upload is missing on the server; upload it again"
    size = Path(path).stat().st_size
    if size > max_upload_mb * MB:
        return (f"{name} is {size / MB:.2f} MB, over the upload limit of {max_upload_mb:g} MB; "
                f"upload a smaller file")
    kind = file_kind(path)
    if kind is None:
        return (f"{name}: {Path(path).suffix or 'no suffix'} files are not supported; upload an image "
                f"({', '.join(IMAGE_SUFFIXES)}) or audio ({', '.join(AUDIO_SUFFIXES)})")
    try:  # decode it now, so a .txt renamed .png is named here
        load_image(path) if kind == "image" else load_audio(path, max_seconds=max_audio_seconds)
    except (ImageError, AudioError) as e:
        reason = upload_names(str(e), [path])
        return reason if reason.startswith(name) else f"{name}: {reason}"
    except MemoryError:  # the server keeps serving the others
        return f"{name}: too large to decode in this server's memory; upload a smaller file"
    return None


def make_respond(model, max_upload_mb: float = 10, max_new_tokens: int = 64):
    """The chat handler `respond(message, history)` -> iterator of the reply so far (for gr.ChatInterface).

    `message` is the multimodal textbox's value {"text": str, "files": [path]}; `history` Gradio's list of
    {"role", "content"} messages. Problems are replies starting with ERROR_MARK, never exceptions. Uploaded audio
    longer than `model.config.max_audio_seconds` is refused before it is decoded whole. A conversation longer than
    the context window forgets its oldest turns (`fit_context`)."""
    def respond(message: dict | str, history: list[dict]) -> Iterator[str]:
        """Stream the model's reply to `message` after `history`."""
        if isinstance(message, str):
            message = {"text": message, "files": []}
        text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        files = [f["path"] if isinstance(f, dict) else str(f) for f in files]
        if not text and not files:
            yield f"{ERROR_MARK} The message is empty: type a question or upload an image or audio file."
            return
        problems = [p for p in (check_file(f, max_upload_mb, model.config.max_audio_seconds) for f in files) if p]
        if problems:
            yield f"{ERROR_MARK} " + "\n".join(problems)
            return
        messages = history_to_messages(history) + [{"role": "user", "content": user_content(text, files)}]
        reply = ""
        try:
            if hasattr(model, "processor"):  # a model here, not a server (which refuses too long a prompt itself)
                messages = fit_context(model, messages, max_new_tokens)
            for piece in model.chat(messages, stream=True, max_new_tokens=max_new_tokens):
                reply += piece
                yield reply.strip()
        except ValueError as e:  # InputError, AudioError, ImageError, a prompt past the context, ...
            yield f"{ERROR_MARK} {upload_names(str(e), files)}"
            return
        except Exception as e:  # the server must keep serving; the log has the traceback
            log.exception("chat failed")
            yield f"{ERROR_MARK} The model failed on this message: {type(e).__name__}: {e}"
            return
        if not reply.strip():
            yield EMPTY_REPLY
        elif not isinstance(folded := fold_rationale(reply.strip()), str):
            yield folded

    return respond


def _load(model_or_path, dtype: str = "float32", device: str = "cpu"):
    """A model as given, or loaded (`dtype`, on `device`) from its directory; None: the shipped one."""
    if model_or_path is None or isinstance(model_or_path, (str, os.PathLike)):
        import torch

        from mm.models.formats import load

        return load(model_or_path, expect=("mm-multimodal",), dtype=getattr(torch, dtype), device=device).eval()
    return model_or_path


def examples() -> list[dict] | None:
    """The four tasks and a question with its rationale (EXAMPLE_LABELS) on the bundled scene and spoken question (None if this install lacks them)."""
    from mm.assets import EXAMPLES_DIR

    image, audio = str(EXAMPLES_DIR / "scene.png"), str(EXAMPLES_DIR / "question.wav")
    if not (Path(image).is_file() and Path(audio).is_file()):
        return None
    return [{"text": "what colour is the star?", "files": [image]}, {"text": "", "files": [image, audio]},
            {"text": "describe the image.", "files": [image]}, {"text": "transcribe the audio.", "files": [audio]},
            {"text": f"what colour is the star? {COT_INSTRUCTION}", "files": [image]}]


def build_demo(model_or_path=None, max_upload_mb: float = 10, max_new_tokens: int = 64, docs_db=None):
    """The chat app (gr.Blocks) for an image + speech FusionModel or its directory (None: the shipped model); a "documents" tab
    indexes uploads into `docs_db` (default: a temporary directory made at the first upload) and answers from them
    with citations; an "agent" tab runs a ReAct agent with tools on a task, every step shown (`mm.apps.agent_tab`)."""
    import gradio as gr

    from mm.apps.agent_tab import agent_tab
    from mm.apps.rag import documents_tab

    model = _load(model_or_path)
    respond = make_respond(model, max_upload_mb, max_new_tokens)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=UPLOAD_CACHE) as demo:
        with gr.Tab("chat"):
            shown = examples()
            gr.ChatInterface(
                respond, multimodal=True, title=TITLE, description=f"{DESCRIPTION} Uploads up to {max_upload_mb:g} MB.",
                chatbot=gr.Chatbot(elem_id="chatbot", render_markdown=False, height=480, label="conversation"),
                textbox=gr.MultimodalTextbox(
                    elem_id="chat-input", file_count="multiple", sources=["upload", "microphone"],
                    placeholder="Ask about an image, or upload/record audio...", show_label=False),
                examples=shown, example_labels=EXAMPLE_LABELS if shown else None, cache_examples=False,
                analytics_enabled=False, autofocus=True)
        with gr.Tab("documents"):
            documents_tab(model, docs_db, max_new_tokens=max_new_tokens)
        with gr.Tab("agent"):  # uploads pass the chat's checks
            agent_tab(model, docs_db, kind=file_kind,
                      check=lambda f: check_file(f, max_upload_mb, model.config.max_audio_seconds))
    return demo


def limit_malloc_arenas(n: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas of this process at n, as MALLOC_ARENA_MAX=n does (left alone when that is set): Gradio
    answers on a pool of worker threads, each thread's arena keeps what it freed, and with glibc's default (8 per core)
    the server's RSS grew 124 MB in 200 requests after warm-up, 20-56 MB with 2 (tests/mm/test_chat_soak.py). True if
    set; False off glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").mallopt(-8, n) == 1  # -8: M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def launch(model_path=None, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 10,
           share: bool = False, max_new_tokens: int = 64, block: bool = True, docs_db=None,
           max_queue: int = MAX_QUEUE, max_sessions: int = MAX_SESSIONS):
    """Serve the chat for a model directory (or a loaded model) on host:port, loopback by default; Gradio refuses
    uploads over max_upload_mb, requests past max_queue waiting ones, and keeps the state of max_sessions sessions
    (a closed tab's history for an hour); the documents tab indexes into docs_db. Returns the demo: with block=False
    at once (stop it with demo.close())."""
    limit_malloc_arenas()
    demo = build_demo(model_path, max_upload_mb, max_new_tokens, docs_db)
    # one generation at a time, others wait in Gradio's queue; an `mm serve` behind (--server) batches them instead
    demo.queue(default_concurrency_limit=16 if hasattr(model_path, "url") else 1, max_size=max_queue)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=int(max_upload_mb * MB),
                prevent_thread_lock=not block, ssr_mode=False, quiet=not block, state_session_capacity=max_sessions)
    return demo


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm chat`."""
    p = argparse.ArgumentParser(prog="mm chat", description="Chat with a multimodal model in the browser.")
    p.add_argument("--model", default=None, help="multimodal model directory (default: the shipped one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves the network: take care)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest file accepted, in MB")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="requests that may wait for the model; more are refused with \"Queue is full\"")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS,
                   help="browser sessions whose chat history the server keeps (least recently used dropped first)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--share", action="store_true", help="make a public gradio.live link")
    p.add_argument("--server", default=None, help="talk to an `mm serve` at this URL (e.g. http://127.0.0.1:8000) "
                   "instead of loading a model")
    p.add_argument("--docs-db", default=None, help="the documents tab's index directory (an `mm rag index --db`; "
                   "default: a temporary one made at the first upload)")
    return p


def run_chat(argv: list[str] | None = None) -> int:
    """`mm chat --model DIR [--host H] [--port P] [--max-upload-mb MB]`: serve until interrupted; the exit code."""
    args = build_parser().parse_args(argv)
    check_port(args.port)
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    for option, value in (("--max-queue", args.max_queue), ("--max-sessions", args.max_sessions)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"model directory not found: {args.model}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if args.server:
        from mm.apps.serve_client import ServerClient

        model = ServerClient(args.server)
    else:
        model = _load(args.model, args.dtype, args.device)
    launch(model, args.host, args.port, args.max_upload_mb, args.share, args.max_new_tokens, docs_db=args.docs_db,
           max_queue=args.max_queue, max_sessions=args.max_sessions)
    return 0
