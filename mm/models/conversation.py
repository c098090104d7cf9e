"""Conversation templates with `<image>` / `<audio>` slots, and their encoding into token ids (the processor,
`mm.models.processor`, turns conversations + media into model inputs with them).

Messages are `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; an image goes where the user text
says `<image>`. Templates:

  llava_v1 (LLaVA-1.5, `conv_vicuna_v1`):  SYSTEM USER: <image>\\nQUESTION ASSISTANT: ANSWER</s>USER: ... ASSISTANT:
  llama3 (Llama 3 chat, `decoders.chat_template`):  <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n
           <image>\\nQUESTION<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
  plain (LLaVA stage-1 pretraining on captions):  <image>CAPTION\\n

Token ids follow original LLaVA's `tokenizer_image_token`: the prompt text is cut at each `<image>`, every piece is
encoded on its own (so with sentencepiece each piece gets its own dummy-prefix space), BOS comes once at the start,
and each `<image>` becomes `tokens_per_image` copies of the image token id. Turn ends (`</s>`, `<|eot_id|>`) and
Llama 3 header tokens are inserted as ids, so user text can never forge them.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from decoders.chat_template import apply_chat_template
from decoders.loss import IGNORE_INDEX
from decoders.tokenizer import SentencePieceTokenizer

IMAGE_PLACEHOLDER = "<image>"
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATES = ("llava_v1", "llama3", "plain")


def _check(messages) -> None:
    if not messages:
        raise ValueError("messages is empty")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str):
            raise ValueError(f"message {k} must be a dict with a 'role' and a str 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {k} has role {m['role']!r}; expected system, user or assistant")
        if m["role"] == "system" and k:
            raise ValueError(f"message {k} is a system message; only the first message may be one")


def segments(messages, template: str = "llava_v1", add_generation_prompt: bool = True,
             system: str | None = None) -> list[tuple[str, str | None]]:
    """The prompt as (kind, text) pieces: kind "text" (encoded), "special" (a special token by name), "eos" (the
    tokenizer's EOS id). Pieces that belong to assistant answers are marked by kind "answer" / "answer_eos"
    so training can keep the loss on them only."""
    _check(messages)
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    out: list[tuple[str, str | None]] = []
    if template == "llava_v1":
        text = (LLAVA_V1_SYSTEM if system is None else system) + " "
        for m in messages:
            role = {"user": "USER", "assistant": "ASSISTANT"}[m["role"]]
            if m["role"] == "user":
                text += f"{role}: {m['content']} "
            else:  # "ASSISTANT: ANSWER</s>"; the space before the answer is added when it is encoded
                out.append(("text", text + f"{role}:"))
                out += [("answer", m["content"].strip()), ("answer_eos", None)]
                text = ""
        if add_generation_prompt:
            text += "ASSISTANT:"
        if text:
            out.append(("text", text))
    elif template == "llama3":
        out.append(("special", "<|begin_of_text|>"))
        turns = ([{"role": "system", "content": system}] if system is not None else []) + list(messages)
        for m in turns:
            out += [("special", "<|start_header_id|>"), ("text", m["role"]), ("special", "<|end_header_id|>"),
                    ("text", "\n\n")]
            if m["role"] == "assistant":
                out += [("answer", m["content"].strip()), ("answer_special", "<|eot_id|>")]
            else:
                out += [("text", m["content"].strip()), ("special", "<|eot_id|>")]
        if add_generation_prompt:
            out += [("special", "<|start_header_id|>"), ("text", "assistant"), ("special", "<|end_header_id|>"),
                    ("text", "\n\n")]
    elif template == "plain":
        for m in messages:
            if m["role"] == "user":  # only the image(s) count here, as in LLaVA's preprocess_plain
                out.append(("text", IMAGE_PLACEHOLDER * m["content"].count(IMAGE_PLACEHOLDER)))
            else:
                out.append(("answer", m["content"] + "\n"))
    else:
        raise ValueError(f"unknown conversation template {template!r}; expected one of {TEMPLATES}")
    return [(k, t) for k, t in out if t != ""]


def format_prompt(messages, template: str = "llava_v1", add_generation_prompt: bool = True,
                  system: str | None = None) -> str:
    """The prompt as text (turn ends written `</s>` / as the special token strings), for display and logs."""
    if template == "llama3":
        _check(messages)
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + list(messages)
        return apply_chat_template(messages, "llama3", add_generation_prompt)
    pieces = segments(messages, template, add_generation_prompt, system)
    return "".join("</s>" if k == "answer_eos" else " " + t if k == "answer" and template == "llava_v1" else t
                   for k, t in pieces)


def encode_pieces(tokenizer, pieces: Sequence[tuple[str, str | None]], slots: dict[str, tuple[int, Callable[[int], int]]],
                  bos: bool = True, space_before_answer: bool = False) -> tuple[list[int], list[int], dict[str, int]]:
    """(ids, labels, placeholders seen per kind) of prompt pieces; labels keep answer tokens, IGNORE_INDEX elsewhere.

    `slots` maps a placeholder ("<image>", "<audio>") to (its token id, k -> how many copies its k-th occurrence
    becomes); text is cut at every placeholder and each piece encoded on its own."""
    ids = [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []
    labels = [IGNORE_INDEX] * len(ids)
    seen = dict.fromkeys(slots, 0)
    split = re.compile("(" + "|".join(re.escape(s) for s in slots) + ")")
    slot_ids = {token for token, _ in slots.values()}
    # "ASSISTANT: ANSWER": sentencepiece's dummy prefix supplies the space of a separately encoded answer;
    # byte-level BPE (tiktoken) needs it written.
    separate_space = space_before_answer and not isinstance(tokenizer, SentencePieceTokenizer)
    specials = getattr(tokenizer, "special_tokens", {})
    for kind, text in pieces:
        answer = kind.startswith("answer")
        if kind in ("special", "answer_special"):
            if text not in specials:
                raise ValueError(f"the template needs the special token {text}, which this tokenizer lacks")
            new = [specials[text]]
        elif kind in ("eos", "answer_eos"):
            if tokenizer.eos_id is None:
                raise ValueError("the template ends turns with EOS, but this tokenizer has no EOS id")
            new = [tokenizer.eos_id]
        elif kind == "answer" and separate_space:
            new = tokenizer.encode(" " + text)
        else:
            new = []
            for chunk in split.split(text):
                if chunk in slots:
                    token, count = slots[chunk]
                    new += [token] * count(seen[chunk])
                    seen[chunk] += 1
                elif chunk:
                    new += tokenizer.encode(chunk)
        ids += new
        labels += [t if answer and t not in slot_ids else IGNORE_INDEX for t in new]
    return ids, labels, seen
