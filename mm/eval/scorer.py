"""Our models behind the two questions an evaluation asks: "what do you answer?" (greedy generation) and "how likely
is this continuation?" (the sum of its token log-probabilities), for `mm.eval.harness` and the lm_eval adapter.

A prompt is a `Prompt`: turns of (user text, assistant answer or None for the turn to answer) plus the images and
audio their `<image>` / `<audio>` placeholders stand for, in order.
    TextLM  a Llama (`decoders.LlamaForCausalLM`) + its tokenizer: the turns are rendered as one text, GPT-3 style
            (each turn "USER ANSWER", turns separated by a blank line), BOS first; no images or audio.
    ChatLM  the multimodal model (`mm.load()`) or LLaVA: the turns become a conversation through the model's own chat
            template (few-shot examples as earlier turns), the media fill their placeholders.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoders.loss import IGNORE_INDEX


@dataclass
class Prompt:
    """turns: [(user text, answer)], the last answer None; images / audios: paths in placeholder order."""

    turns: list[tuple[str, str | None]]
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)


def continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> tuple[float, bool]:
    """(sum of log p(ids[t] | ids[:t]) for t >= start, whether every one of those tokens is the argmax) for one row:
    logits [T - 1, V] of ids[:-1], position t - 1 predicting ids[t] (the last token is never an input)."""
    logp = torch.log_softmax(logits[start - 1:].float(), dim=-1)  # [n, V]
    target = ids[start:]
    picked = logp.gather(-1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logp.argmax(-1) == target).all())


class TextLM:
    """A causal Llama and its tokenizer as a scorer of text prompts."""

    chat = False

    def __init__(self, model, tokenizer, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens

    def render(self, prompt: Prompt) -> str:
        """The prompt as one text: "USER ANSWER" per solved turn, a blank line between turns, the last left open."""
        if prompt.images or prompt.audios:
            raise ValueError("this model reads text only; items with image or audio need the multimodal model")
        return "\n\n".join(u if a is None else f"{u} {a}" for u, a in prompt.turns)

    def encode(self, text: str) -> list[int]:
        """Token ids of text with BOS first."""
        return self.tokenizer.encode(text, bos=True)

    @torch.inference_mode()
    def logprob_ids(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(log p(continuation | context), greedy?) for token ids."""
        if not continuation:
            raise ValueError("empty continuation: nothing to score")
        ids = torch.tensor(context + continuation, device=self.model.device)
        logits = self.model(ids[None, :-1])[0]  # [T - 1, V]
        return continuation_logprob(logits, ids, len(context))

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as lm-evaluation-harness cuts them: the whole text is encoded once
        and the continuation is what follows the context's own tokens (trailing spaces move to the continuation)."""
        n = len(context) - len(context.rstrip(" "))
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        if whole[:len(ctx)] != ctx:  # a token straddles the boundary: encode the continuation on its own
            return ctx, self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, prompt: Prompt, continuation: str) -> tuple[float, bool]:
        """(log p(" " + continuation | rendered prompt), greedy?): the answer as it would follow in a solved turn."""
        return self.logprob_ids(*self.split(self.render(prompt), " " + continuation))

    @torch.inference_mode()
    def generate_text(self, text: str, max_new_tokens: int | None = None, stop: list[str] | tuple = ()) -> str:
        """Greedy continuation of text, cut at the first stop string."""
        from decoders.generate import generate

        ids = torch.tensor([self.encode(text)], device=self.model.device)
        stops = sorted(getattr(self.tokenizer, "stop_ids", set())) or None
        out = generate(self.model, ids, max_new_tokens=max_new_tokens or self.max_new_tokens, eos_token_id=stops)
        prompt, new = ids[0].tolist(), out[0, ids.shape[1]:].tolist()
        new = new[:next((i for i, t in enumerate(new) if stops and t in stops), len(new))]
        # decoded after the prompt, so the reply keeps its leading space (decoding it alone would drop it)
        before, whole = self.tokenizer.decode(prompt), self.tokenizer.decode(prompt + new)
        reply = whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(new)
        for s in stop:
            reply = reply.split(s)[0] if s else reply
        return reply

    def generate(self, prompt: Prompt, max_new_tokens: int | None = None) -> str:
        """The greedy answer to the prompt's open turn: its first line (a base model runs on into the next turn)."""
        return self.generate_text(self.render(prompt), max_new_tokens, stop=("\n",)).strip()


class Transcriber:
    """A speech recognizer (ESPnet/Dolphin or ours): it only transcribes."""

    chat = True

    def __init__(self, model):
        self.model = model

    def transcribe(self, audio) -> str:
        """The model's transcript of one audio file."""
        return self.model.transcribe(audio)

    def generate(self, prompt: Prompt, max_new_tokens: int | None = None) -> str:
        raise ValueError("a speech recognizer only transcribes: use --task asr with the default template, zero-shot")

    def loglikelihood(self, prompt: Prompt, continuation: str):
        raise ValueError("a speech recognizer scores no answers: use --task asr")


class ChatLM:
    """The multimodal model or LLaVA as a scorer of conversations with media."""

    chat = True

    def __init__(self, model, max_new_tokens: int = 64):
        self.model, self.max_new_tokens = model.eval(), max_new_tokens
        self.takes_audio = "speech" in getattr(model, "modalities", ())

    def messages(self, prompt: Prompt, answer: str | None = None) -> list[dict]:
        """The conversation: user/assistant turns, then the open user turn (answered by `answer` when given)."""
        msgs = []
        for u, a in prompt.turns:
            msgs.append({"role": "user", "content": u})
            if a is not None:
                msgs.append({"role": "assistant", "content": a})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def inputs(self, prompt: Prompt, answer: str | None = None) -> dict:
        """Processor outputs for the conversation (with answer-token labels when `answer` is given)."""
        if prompt.audios and not self.takes_audio:
            raise ValueError("this model takes no audio; items with audio need the multimodal model")
        media = {"audios": prompt.audios} if self.takes_audio else {}
        return self.model.processor()(self.messages(prompt, answer), images=prompt.images,
                                      add_generation_prompt=answer is None, labels=answer is not None, **media)

    @torch.inference_mode()
    def loglikelihood(self, prompt: Prompt, continuation: str) -> tuple[float, bool]:
        """(log p(continuation as the assistant's whole reply, its turn end included), greedy?)."""
        x = self.inputs(prompt, continuation)
        kwargs = {"speech": x["speech"], "speech_lengths": x["speech_lengths"]} if x.get("speech") is not None else {}
        out = self.model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], **kwargs)
        logits = getattr(out, "logits", out)[0]  # [T, V]
        labelled = (x["labels"][0] != IGNORE_INDEX).nonzero()[:, 0].tolist()
        start = labelled[-1]
        while start - 1 in labelled:  # the last run of answer tokens: this reply, not the examples' replies
            start -= 1
        ids = x["input_ids"][0].to(logits.device)
        return continuation_logprob(logits[: labelled[-1]], ids[: labelled[-1] + 1], start)

    def transcribe(self, audio) -> str:
        """The model's own transcript (joint CTC/decoder search for the multimodal model)."""
        return self.model.transcribe(audio)

    def generate(self, prompt: Prompt, max_new_tokens: int | None = None) -> str:
        """The model's greedy reply to the conversation."""
        media = {"audios": prompt.audios} if self.takes_audio and prompt.audios else {}
        return self.model.chat(self.messages(prompt), images=prompt.images or None,
                               max_new_tokens=max_new_tokens or self.max_new_tokens, **media)


def load_scorer(path=None, max_new_tokens: int = 64):
    """A TextLM, ChatLM or Transcriber for a checkpoint path (None: the shipped multimodal model), by
    `mm.models.formats`."""
    from mm.models.formats import load

    model = load(path)
    if hasattr(model, "processor"):
        return ChatLM(model, max_new_tokens)
    if hasattr(model, "embed_tokens"):
        from decoders.tokenizer import load_tokenizer

        return TextLM(model, load_tokenizer(path), max_new_tokens)
    return Transcriber(model)
