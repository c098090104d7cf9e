"""Chat messages holding text, images and audio -> model inputs for `mm.models.fusion.FusionModel`.

A message's content is a string with `<image>` / `<audio>` placeholders (the media then come as `images=` /
`audios=`, in placeholder order), or a list of parts in the Hugging Face style:
    {"type": "text", "text": "what colour is the star?"}
    {"type": "image", "image": PIL image | path | bytes}
    {"type": "audio", "audio": path | waveform array/tensor, "sampling_rate": 16000 (arrays only)}
Each `<image>` becomes `tokens_per_image` image tokens and each `<audio>` as many audio tokens as its utterance
gives adapted features. Batches are left-padded with attention_mask 1 on real tokens; positions follow the mask.
Token ids follow `mm.models.conversation` (LLaVA's `tokenizer_image_token`). A model without speech (LLaVA) gets a
processor without audio, one without vision one without images: media it cannot take are an InputError.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from decoders.loss import IGNORE_INDEX
from encoders.audio import AudioError, load_audio
from encoders.image import ImageError, load_image

from mm.models.conversation import IMAGE_PLACEHOLDER, TEMPLATES, encode_pieces, segments

AUDIO_PLACEHOLDER = "<audio>"


class InputError(ValueError):
    """A message, image or audio the model cannot take; the text says which and why."""


def flatten_parts(messages) -> tuple[list[dict], list, list]:
    """Messages with list contents -> (messages with placeholder strings, images in order, audios in order)."""
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"a conversation must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    if not messages:
        raise InputError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
    out, images, audios = [], [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"message {k} must be a dict with 'role' and 'content', got {m!r:.200}")
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"message {k}: content must be a str or a list of parts, got {type(content).__name__}")
        text = ""
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text", ""), str):
                    raise InputError(f"message {k}: a text part's text must be a str, got {type(part['text']).__name__}")
                text += part.get("text", "")
            elif kind == "image":
                text += IMAGE_PLACEHOLDER
                images.append(part.get("image", part.get("path")))
            elif kind == "audio":
                text += AUDIO_PLACEHOLDER
                audio = part.get("audio", part.get("path"))
                audios.append(audio if "sampling_rate" not in part else (audio, part["sampling_rate"]))
            else:
                raise InputError(f"message {k}: a content part must be a dict with type text, image or audio, "
                                 f"got {part!r:.200}")
        out.append({"role": m["role"], "content": text})
    return out, images, audios


def as_list(media, name: str) -> list:
    """`images=` / `audios=` as a list: one path, bytes, PIL image or (waveform, rate) pair is a list of one."""
    if media is None:
        return []
    if isinstance(media, (str, bytes, os.PathLike)) or hasattr(media, "getpixel") or (
            isinstance(media, tuple) and len(media) == 2 and isinstance(media[1], int)):
        return [media]
    if not isinstance(media, (list, tuple)):
        raise InputError(f"{name} must be a list (or one item), got {type(media).__name__}")
    return list(media)


class MultimodalProcessor:
    """Conversations + images + audio -> input_ids, attention_mask, pixel_values, speech, speech_lengths (+ labels)."""

    def __init__(self, tokenizer, image_processor, image_token_id: int, tokens_per_image: int | None,
                 template: str = "llava_v1", system: str | None = None, *, audio_token_id: int | None = None,
                 audio_feature_lengths: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_audio_seconds: float = 30.0, sample_rate: int = 16000):
        if template not in TEMPLATES:
            raise ValueError(f"unknown conversation template {template!r}; expected one of {TEMPLATES}")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token_id, self.tokens_per_image = image_token_id, tokens_per_image
        self.audio_token_id, self.audio_feature_lengths = audio_token_id, audio_feature_lengths
        self.template, self.system = template, system
        self.max_audio_seconds, self.sample_rate = max_audio_seconds, sample_rate

    def load_audio(self, audio, index: int = 0, whole: bool = False, max_seconds: float | None = None) -> torch.Tensor:
        """One waveform [S] at the model's rate from a path, (array, rate) or a 1-D tensor already at that rate; longer
        than max_audio_seconds is an InputError; `whole` (a recording to be cut into windows): than max_seconds."""
        limit = max_seconds if whole else self.max_audio_seconds
        try:
            if isinstance(audio, tuple):
                path = isinstance(audio[0], (str, os.PathLike))  # a file is stopped as it is read, an array below
                wave, _ = load_audio(audio[0], sample_rate=audio[1], target_rate=self.sample_rate,
                                     max_seconds=limit if path else None)
            elif isinstance(audio, torch.Tensor):
                wave, _ = load_audio(audio, sample_rate=self.sample_rate, target_rate=self.sample_rate)
            elif isinstance(audio, (str, os.PathLike)):
                wave, _ = load_audio(audio, target_rate=self.sample_rate, max_seconds=limit)
            else:
                raise InputError(f"audio {index}: expected a path, a (waveform, sampling_rate) pair or a tensor at "
                                 f"{self.sample_rate} Hz, got {type(audio).__name__}")
        except AudioError as e:
            raise InputError(f"audio {index}: {e}") from e
        seconds = wave.shape[0] / self.sample_rate
        if limit is not None and seconds > limit:
            raise InputError(f"audio {index}: {seconds:.1f} s is longer than the limit of {limit:g} s")
        return wave

    def load_image(self, image, index: int = 0):
        """One RGB PIL image (path, bytes, PIL image); unreadable data raises InputError naming it."""
        try:
            return load_image(image)
        except (ImageError, TypeError) as e:
            raise InputError(f"image {index}: {e}") from e

    def encode(self, messages, audio_lengths: list[int], add_generation_prompt: bool = True):
        """(ids, labels, {placeholder: count}) of one conversation whose k-th `<audio>` takes audio_lengths[k] tokens."""
        if isinstance(messages, str):
            pieces = [("text", messages)]
        else:
            try:
                pieces = segments(messages, self.template, add_generation_prompt, self.system)
            except ValueError as e:
                raise InputError(str(e)) from e
        n_audio = sum(t.count(AUDIO_PLACEHOLDER) for _, t in pieces if t)
        if n_audio != len(audio_lengths):
            raise InputError(f"the conversation has {n_audio} '{AUDIO_PLACEHOLDER}' placeholder(s) but "
                             f"{len(audio_lengths)} audio input(s) were given")
        slots = {IMAGE_PLACEHOLDER: (self.image_token_id, lambda k: self.tokens_per_image),
                 AUDIO_PLACEHOLDER: (self.audio_token_id, lambda k: audio_lengths[k])}
        bos = isinstance(messages, str) or self.template != "llama3"  # <|begin_of_text|> is the BOS there
        return encode_pieces(self.tokenizer, pieces, slots, bos=bos, space_before_answer=self.template == "llava_v1")

    def gather(self, conversations, images=None, audios=None) -> tuple[list, list[list], list[list]]:
        """(conversations with placeholder strings, images per conversation, audios per conversation): media given
        as content parts, then `images` / `audios` (flat lists over the batch in placeholder order, or for images one
        list per conversation) filling the placeholders left without a part, conversation after conversation."""
        if not isinstance(conversations, (str, dict, list, tuple)):
            raise InputError(f"a conversation must be a list of {{'role', 'content'}} messages, got "
                             f"{type(conversations).__name__}")
        if isinstance(conversations, (str, dict)) or (conversations and isinstance(conversations[0], dict)):
            conversations = [conversations]
        if not conversations:
            raise InputError("messages is empty: give at least one {'role': 'user', 'content': ...} message")
        nested = isinstance(images, (list, tuple)) and bool(images) and all(isinstance(x, (list, tuple)) for x in images)
        if nested and len(images) != len(conversations):
            raise InputError(f"{len(images)} image lists for {len(conversations)} prompts")
        per_prompt, images, audios = (images if nested else None), ([] if nested else as_list(images, "images")), \
            as_list(audios, "audios")
        flat, per_images, per_audios, counts = [], [], [], []
        for k, c in enumerate(conversations):
            msgs, ims, auds = (c, [], []) if isinstance(c, str) else flatten_parts(c)
            text = msgs if isinstance(c, str) else "".join(m["content"] for m in msgs)
            n_img, n_aud = text.count(IMAGE_PLACEHOLDER), text.count(AUDIO_PLACEHOLDER)
            if per_prompt is not None:
                ims += per_prompt[k]
                if len(ims) != n_img:
                    raise InputError(f"prompt {k} has {n_img} '{IMAGE_PLACEHOLDER}' placeholder(s) but {len(ims)} image(s)")
            need_img, need_aud = n_img - len(ims), n_aud - len(auds)
            if need_img < 0 or need_aud < 0:
                raise InputError(f"a conversation has {n_img} image and {n_aud} audio placeholder(s) but "
                                 f"{len(ims)} image and {len(auds)} audio part(s)")
            flat.append(msgs)
            per_images.append(ims + images[:need_img])
            per_audios.append(auds + audios[:need_aud])
            images, audios = images[need_img:], audios[need_aud:]
            counts.append((n_img, n_aud))
        for i, (name, ph, rest, per) in enumerate((("image", IMAGE_PLACEHOLDER, images, per_images),
                                                   ("audio", AUDIO_PLACEHOLDER, audios, per_audios))):
            given, wanted = sum(len(p) for p in per) + len(rest), [c[i] for c in counts]
            if given != sum(wanted) or rest:
                raise InputError(f"the conversation(s) have {sum(wanted)} '{ph}' placeholder(s) but {given} {name}(s) "
                                 f"were given: one {name} per placeholder (placeholders per conversation: {wanted}, "
                                 f"but {given} {name}(s))")
        return flat, per_images, per_audios

    def audio_lengths(self, sources: list, waves: list[torch.Tensor]) -> list[int]:
        """Audio tokens of each waveform; an utterance too short to hear is an InputError naming it."""
        speech_lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
        try:
            return self.audio_feature_lengths(speech_lengths).tolist() if waves else []
        except ValueError:  # SpeechTooShortError: name the first utterance too short to hear
            for k, (source, wave) in enumerate(zip(sources, waves)):
                try:
                    self.audio_feature_lengths(speech_lengths[k:k + 1])
                except ValueError as e:
                    name = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
                    raise InputError(f"audio {k}: {name}{wave.shape[0] / self.sample_rate * 1000:.0f} ms is too short "
                                     f"to hear ({e})") from e
            raise

    def pad(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) [B, T] of (ids, labels) rows, left-padded with the tokenizer's pad id
        (else 0), mask 0 and IGNORE_INDEX."""
        T = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_id if getattr(self.tokenizer, "pad_id", None) is not None else 0
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, T - len(ids):] = torch.tensor(ids)
            attention_mask[b, T - len(ids):] = 1
            labels[b, T - len(ids):] = torch.tensor(lab)
        return input_ids, attention_mask, labels

    def __call__(self, conversations, images=None, audios=None, add_generation_prompt: bool = True,
                 labels: bool = False) -> dict:
        """Model inputs for one conversation (messages, or raw text: BOS + text) or a batch, media as `gather` takes
        them; with labels=True also `labels` (answer tokens only)."""
        flat, per_images, per_audios = self.gather(conversations, images, audios)
        sources = [x for p in per_audios for x in p]
        if sources and self.audio_feature_lengths is None:
            raise InputError("this model has no speech encoder: it takes no audio")
        if any(per_images) and self.image_processor is None:
            raise InputError("this model has no vision tower: it takes no images")
        all_images = [self.load_image(im, k) for k, im in enumerate(x for p in per_images for x in p)]
        waves = [self.load_audio(a, k) for k, a in enumerate(sources)]
        feature_lengths = self.audio_lengths(sources, waves)
        encoded, at = [], 0
        for c, auds in zip(flat, per_audios):
            encoded.append(self.encode(c, feature_lengths[at:at + len(auds)], add_generation_prompt))
            at += len(auds)
        input_ids, attention_mask, label_ids = self.pad([(ids, lab) for ids, lab, _ in encoded])
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        out["pixel_values"] = self.image_processor(all_images) if all_images else None
        out["speech"] = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True) if waves else None
        out["speech_lengths"] = torch.tensor([w.shape[0] for w in waves], dtype=torch.long) if waves else None
        if labels:
            out["labels"] = label_ids
        return out


LlavaProcessor = MultimodalProcessor  # the same processor; a LLaVA model's has no audio
