"""`mm serve`: an OpenAI-compatible chat server over the multimodal model, batching concurrent requests.

    POST /v1/chat/completions   {"messages": [...], "max_tokens", "temperature", "top_p", "top_k", "seed", "stream"}
    GET  /v1/models

Message content is a string or a list of OpenAI content parts: {"type": "text", "text"}, {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}} and {"type": "input_audio", "input_audio": {"data": base64,
"format": "wav"}} (media come inline; the server fetches no URLs). Each request's prompt is built and embedded
(ViT / speech encoder) in a worker thread exactly as `model.chat` builds it; its embeddings are then prefilled into a
free row of one `decoders.batching.BatchingEngine`, whose thread decodes one token for every active request per step
(continuous batching: requests join and leave between steps). Greedy by default (temperature 0), unlike OpenAI's 1.
With `"stream": true` the reply comes as server-sent events (`data: {chunk}` ... `data: [DONE]`).
Bad requests get a 400 (413 for a body over the limit) with an OpenAI-style {"error": {"message", ...}}.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import tempfile
import time
import uuid

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from decoders.batching import BatchingEngine
from decoders.stream_decoder import StreamDecoder

from mm.apps.options import check_port, set_threads

MB = 2**20
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3", "m4a", "webm", "opus")  # read as `model.chat` reads such a file


class BadRequest(ValueError):
    """A request the server refuses, with its HTTP status (400 unless said) and a message naming what is wrong."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def error_response(e: BadRequest) -> JSONResponse:
    return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error", "param": e.param, "code": None}},
                        status_code=e.status)


def _b64(data, what: str) -> bytes:
    if not isinstance(data, str):
        raise BadRequest(f"{what}: expected a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{what}: not valid base64 ({e})") from None


def content_parts(content, k: int, tmp: list[str]) -> str | list[dict]:
    """OpenAI content of message k -> the model's content (parts with image bytes and audio file paths); audio is
    written to temporary files (their paths appended to `tmp`) so it is read as `model.chat` reads a file."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"messages[{k}].content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        where = f"messages[{k}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise BadRequest(f"{where}: image_url.url must be a data URL (data:image/png;base64,...); "
                                 "the server fetches no URLs")
            parts.append({"type": "image", "image": _b64(url.split(";base64,", 1)[1], f"{where} image_url")})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            fmt = audio.get("format", "wav") if isinstance(audio, dict) else None
            if fmt not in AUDIO_FORMATS:
                raise BadRequest(f"{where}: input_audio must be {{'data': base64, 'format': one of {', '.join(AUDIO_FORMATS)}}}")
            data = _b64(audio.get("data"), f"{where} input_audio.data")
            fd, path = tempfile.mkstemp(suffix="." + fmt)
            tmp.append(path)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            parts.append({"type": "audio", "audio": path})
        else:
            raise BadRequest(f"{where}: a part must have type text, image_url or input_audio, got {str(part)[:200]}")
    return parts


def check_options(body: dict, max_new_default: int) -> dict:
    """Sampling options of a request body, range-checked (400 naming the field)."""
    if body.get("n", 1) != 1:
        raise BadRequest("n: only one choice per request is supported", param="n")
    if body.get("stop") is not None:
        raise BadRequest("stop: stop sequences are not supported (the model stops at its end-of-turn token)", param="stop")
    top_p = body.get("top_p")
    opts = {"max_new_tokens": body.get("max_completion_tokens", body.get("max_tokens", max_new_default)),
            "temperature": body.get("temperature", 0.0), "top_p": None if top_p == 1 else top_p,
            "top_k": body.get("top_k"), "seed": body.get("seed")}
    n, seed = opts["max_new_tokens"], opts["seed"]
    for field, value, ok in (("max_tokens", n, isinstance(n, int) and n > 0),
                             ("seed", seed, seed is None or isinstance(seed, int))):
        if not ok:
            raise BadRequest(f"{field}: expected a positive integer, got {value!r}", param=field)
    return opts


class ChatServer:
    """The multimodal model, its processor and one batching engine over its decoder."""

    def __init__(self, model, name: str = "mm", max_batch: int = 8, max_new_tokens: int = 256):
        if not hasattr(model, "speech_encoder") or getattr(model, "tokenizer", None) is None:
            raise ValueError(f"mm serve serves the multimodal model with its tokenizer (mm.load()); got {type(model).__name__}")
        self.model, self.name, self.max_new_tokens = model.eval(), name, max_new_tokens
        self.processor = model.processor()
        self.stops = sorted(model.tokenizer.stop_ids)
        self.engine = BatchingEngine(model.language_model, max_batch=max_batch)
        self.created = int(time.time())

    def prepare(self, messages) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenAI messages -> (prompt ids [T], its embeddings [T, D]) as `model.chat` builds them (a worker thread)."""
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: expected a non-empty list of {'role', 'content'}", param="messages")
        tmp: list[str] = []
        try:
            msgs = []
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise BadRequest(f"messages[{k}] must be an object with role and content", param="messages")
                msgs.append({"role": m["role"], "content": content_parts(m["content"], k, tmp)})
            try:
                inputs = self.processor(msgs)
            except ValueError as e:  # the processor's InputError, an unreadable image or audio, ...
                raise BadRequest(str(e), param="messages") from None
        finally:
            for path in tmp:
                os.unlink(path)
        ids = inputs["input_ids"]  # [1, T]
        limit = self.engine.max_tokens
        if ids.shape[1] >= limit:
            raise BadRequest(f"the prompt takes {ids.shape[1]} tokens; the context window of {limit} leaves no room "
                             "to answer", param="messages")
        h = self.model.inputs_embeds(ids, inputs["pixel_values"], inputs["speech"], inputs["speech_lengths"])
        return ids[0], h[0]  # [T], [T, D]

    def submit(self, ids, embeds, opts: dict, on_token=None):
        try:
            return self.engine.submit(ids, inputs_embeds=embeds, eos_token_id=self.stops, on_token=on_token, **opts)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def text(self, tokens: list[int]) -> str:
        """The reply's text, cut at the first stop token, stripped: what `model.chat` returns."""
        cut = next((i for i, t in enumerate(tokens) if t in self.stops), len(tokens))
        return self.model.tokenizer.decode(tokens[:cut]).strip()


class TextStream:
    """Tokens pushed one at a time -> text pieces, multi-byte safe (`StreamDecoder`), ending at a stop token, with
    the reply's leading and trailing whitespace dropped: the pieces `model.chat(stream=True)` yields (its `stripped`),
    in push form for an event loop."""

    def __init__(self, tokenizer, context_ids: list[int], stops: set[int]):
        self.decoder, self.stops = StreamDecoder(tokenizer, context_ids=context_ids), stops
        self.started, self.held, self.stopped = False, "", False

    def push(self, token: int) -> str:
        if self.stopped or token in self.stops:
            self.stopped = True
            return ""
        return self._strip(self.decoder.push(token) or "")

    def close(self) -> str:
        return self._strip(self.decoder.flush() or "")

    def _strip(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = piece.rstrip()
        if not body:
            self.held += piece
            return ""
        out, self.held = self.held + body, piece[len(body):]
        return out


def completion(server: ChatServer, cid: str, text: str, ids, req) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": server.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": req.finish_reason}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(req.tokens),
                      "total_tokens": len(ids) + len(req.tokens)}}


def chunk(server: ChatServer, cid: str, delta: dict, finish: str | None = None) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": server.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


async def read_json(request: Request, max_bytes: int) -> dict:
    """The JSON body, refused beyond max_bytes (413) or when it is not a JSON object (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes", status=413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise BadRequest(f"request body exceeds the limit of {max_bytes} bytes", status=413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    return data


def create_app(server: ChatServer, max_body_bytes: int = 20 * MB) -> Starlette:
    """The Starlette app; its lifespan starts and stops the engine thread."""

    async def chat_completions(request: Request):
        try:
            body = await read_json(request, max_body_bytes)
            if body.get("stream") not in (None, False, True):
                raise BadRequest("stream: expected true or false", param="stream")
            opts = check_options(body, server.max_new_tokens)
            ids, embeds = await run_in_threadpool(server.prepare, body.get("messages"))
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            if not body.get("stream"):
                req = server.submit(ids, embeds, opts)
                try:
                    await run_in_threadpool(req.done.wait)
                except BaseException:
                    server.engine.cancel(req)
                    raise
                if req.error is not None:
                    return JSONResponse({"error": {"message": str(req.error), "type": "server_error"}}, status_code=500)
                return JSONResponse(completion(server, cid, server.text(req.tokens), ids, req))
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            req = server.submit(ids, embeds, opts, on_token=lambda t: loop.call_soon_threadsafe(events.put_nowait, t))
        except BadRequest as e:
            return error_response(e)

        async def sse():
            try:
                yield chunk(server, cid, {"role": "assistant", "content": ""})
                text = TextStream(server.model.tokenizer, ids.tolist(), set(server.stops))
                while (t := await events.get()) is not None:
                    if piece := text.push(t):
                        yield chunk(server, cid, {"content": piece})
                if piece := text.close():
                    yield chunk(server, cid, {"content": piece})
                if req.error is not None:
                    yield f"data: {json.dumps({'error': {'message': str(req.error), 'type': 'server_error'}})}\n\n"
                else:
                    yield chunk(server, cid, {}, req.finish_reason)
                yield "data: [DONE]\n\n"
            finally:
                server.engine.cancel(req)  # a client gone mid-reply frees its row (no-op once finished)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def models(request: Request):
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "mm",
                "context_window": server.engine.max_tokens, "max_audio_seconds": server.model.config.max_audio_seconds}
        return JSONResponse({"object": "list", "data": [card]})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        server.engine.stop()

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])], lifespan=lifespan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm serve", description="OpenAI-compatible /v1/chat/completions over the multimodal "
                                "model, batching concurrent requests (continuous batching).")
    p.add_argument("--model", default=None, help="multimodal model directory (default: the shipped model)")
    p.add_argument("--name", default=None, help="the model id /v1/models reports (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (cache rows)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="reply budget when a request gives no max_tokens")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (media are inline base64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    return p


def run_serve(argv: list[str] | None = None) -> int:
    """`mm serve`: load the model and serve it with uvicorn until interrupted."""
    import uvicorn

    import mm
    from mm.assets import default_multimodal_dir

    args = build_parser().parse_args(argv)
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    check_port(args.port)
    set_threads(args.threads)
    path = args.model or default_multimodal_dir()
    model = mm.load(path, dtype=getattr(torch, args.dtype))
    server = ChatServer(model, args.name or os.path.basename(os.path.normpath(path)), args.max_batch, args.max_new_tokens)
    app = create_app(server, int(args.max_body_mb * MB))
    print(f"mm serve: {path} on http://{args.host}:{args.port}/v1 (batch {args.max_batch})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
