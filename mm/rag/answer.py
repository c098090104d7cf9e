"""Retrieval-augmented answers: the top-k chunks numbered in a prompt that asks for [n] citations, the model's reply,
and the list of the sources it was given (those it cited first).

The prompt fits the model's context: sources are dropped from the last and the last one cut short until the
prompt plus the reply's tokens fit. When the best image chunk is an image the model can see, the image itself
goes in the message beside its caption.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from mm.rag.index import Hit, Index

INSTRUCTION = ("Answer the question using the numbered sources below. Cite the sources you use as [1], [2], ... "
               "If they do not hold the answer, say so.")
CITE = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    """The model's reply, the hits it was shown (numbered from 1) and the numbers it cited."""

    text: str
    sources: list[Hit] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)

    def citations(self) -> list[tuple[int, Hit]]:
        """(number, hit) of the cited sources, else of all the sources shown."""
        numbers = self.cited or list(range(1, len(self.sources) + 1))
        return [(n, self.sources[n - 1]) for n in numbers]

    def __str__(self) -> str:
        lines = [self.text.strip() or "(no answer)", "", "Sources:"]
        lines += [f"[{n}] {hit.cite()}" for n, hit in self.citations()]
        return "\n".join(lines)


def prompt(question: str, hits: list[Hit]) -> str:
    """The user's message: the instruction, the numbered sources with their citations, the question."""
    sources = "\n\n".join(f"[{n}] {hit.cite()}:\n{hit.text.strip()}" for n, hit in enumerate(hits, start=1))
    return f"{INSTRUCTION}\n\n{sources}\n\nQuestion: {question.strip()}"


def message(question: str, hits: list[Hit], image: str | None) -> list[dict]:
    """The chat messages for `question`, with the image of an image hit first when there is one."""
    text = prompt(question, hits)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "\n" + text}] if image else text
    return [{"role": "user", "content": content}]


def context_length(model) -> int | None:
    """The model's context in tokens, if its config says."""
    for config in (getattr(getattr(model, "language_model", None), "config", None), getattr(model, "config", None)):
        if getattr(config, "max_position_embeddings", None):
            return int(config.max_position_embeddings)
    return None


def prompt_tokens(model, messages: list[dict]) -> int:
    """Tokens of the messages as the model's processor encodes them."""
    return int(model.processor()(messages)["input_ids"].shape[-1])


def fit(model, question: str, hits: list[Hit], image: str | None, max_new_tokens: int) -> tuple[list[dict], list[Hit]]:
    """Messages within the model's context: fewer sources, then the last one shorter, until they fit."""
    limit = context_length(model) if hasattr(model, "processor") else None  # None: no way to count, nothing cut
    hits = list(hits)
    while True:
        messages = message(question, hits, image)
        if limit is None or prompt_tokens(model, messages) + max_new_tokens <= limit:
            return messages, hits
        if len(hits) > 1:
            hits.pop()
        elif hits and len(hits[0].text) > 40:
            hits[0] = replace(hits[0], text=hits[0].text[: len(hits[0].text) // 2])
        elif image:
            image = None
        else:
            raise ValueError(f"the question alone ({len(question)} characters) does not fit the model's context of "
                             f"{limit} tokens with {max_new_tokens} new tokens")


def answer(model, index: Index, question: str, k: int = 4, max_new_tokens: int = 64, **search) -> Answer:
    """Retrieve the k best chunks for `question` from `index`, ask `model` (anything with `chat(messages)`) to answer
    from them with citations. `search`: options of `Index.search` (metric, mode, approximate)."""
    if not question.strip():
        raise ValueError("the question is empty")
    hits = index.search(question, k=k, **search)
    can_see = "image" in getattr(model, "modalities", ())  # a fusion model with a vision tower
    image = next((h.source for h in hits if h.kind == "image"), None) if can_see else None
    messages, shown = fit(model, question, hits, image, max_new_tokens)
    reply = model.chat(messages, max_new_tokens=max_new_tokens)
    return Answer(reply, shown, cited_numbers(reply, len(shown)))


def cited_numbers(reply: str, n_sources: int) -> list[int]:
    """The source numbers [n] a reply cites, in order of first mention, within 1..n_sources."""
    numbers = map(int, CITE.findall(reply))
    return list(dict.fromkeys(n for n in numbers if 1 <= n <= n_sources))  # a dict keeps the first mentions' order
