"""A client of `mm serve` (or another OpenAI-compatible server) with the model's `chat` signature: what
`mm chat --server URL` talks to. Media in the model's message format (image / audio file paths or bytes) go inline as
OpenAI content parts (data URLs, input_audio)."""
from __future__ import annotations

import argparse
import base64
import json
import os


def openai_content(content) -> str | list[dict]:
    """The model's message content (a string, or parts with image / audio paths or bytes) -> OpenAI content parts."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        media = part.get(kind, part.get("path")) if kind in ("image", "audio") else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind in ("image", "audio") and isinstance(media, (str, os.PathLike, bytes)):
            data = media if isinstance(media, bytes) else open(media, "rb").read()
            b64 = base64.b64encode(data).decode()
            if kind == "image":
                parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}})
            else:
                fmt = "wav" if isinstance(media, bytes) else os.path.splitext(str(media))[1].lstrip(".").lower()
                parts.append({"type": "input_audio", "input_audio": {"data": b64, "format": fmt}})
        else:
            raise ValueError(f"a part for the server must be text, or an image / audio file path or bytes: {str(part)[:200]}")
    return parts


class ServerClient:
    """`model.chat` over HTTP to an `mm serve` (or another OpenAI-compatible) server: what `mm chat --server` talks to.
    A request the server refuses is a ValueError carrying the server's message."""

    def __init__(self, url: str, timeout: float = 600):
        import httpx

        self.url, self.timeout, self.http = url.rstrip("/"), timeout, httpx
        card = httpx.get(self.url + "/v1/models", timeout=timeout).raise_for_status().json()["data"][0]
        self.name = card["id"]
        self.config = argparse.Namespace(  # what mm chat reads of a model
            max_audio_seconds=card.get("max_audio_seconds", 30.0))

    def chat(self, messages, stream: bool = False, max_new_tokens: int = 64, **options):
        """The reply's text (stream=True: its pieces as they come); options: temperature, top_p, top_k, seed."""
        body = {"model": self.name, "max_tokens": max_new_tokens, "stream": stream, **options,
                "messages": [{"role": m["role"], "content": openai_content(m["content"])} for m in messages]}
        if not stream:
            r = self.http.post(self.url + "/v1/chat/completions", json=body, timeout=self.timeout)
            self._check(r)
            return r.json()["choices"][0]["message"]["content"]
        return self._stream(body)

    def _stream(self, body: dict):
        with self.http.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(f"the server failed: {event['error'].get('message')}")
                if piece := event["choices"][0]["delta"].get("content"):
                    yield piece

    @staticmethod
    def _check(r) -> None:
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:500]
            raise ValueError(f"the server refused the request ({r.status_code}): {message}")
