"""One model that sees, hears and answers: LLaVA's ViT + projector and an E-Branchformer + CTC head + speech
adapter, both feeding ONE Llama decoder.

    image [3, H, W] -> ViT -> projector ------------------\\
                                                          +-> features at <image>/<audio> token slots -> Llama
    audio [S] -> log-mel -> 4x conv -> E-Branchformer -> speech adapter (k-fold stacking + MLP)
                                                    \\-> CTC head (training loss; greedy transcript aid)

It is `mm.models.llava.LlavaForConditionalGeneration` with a speech path added: the image side, its weight names
(`vision_tower.*`, `projector.*`, `language_model.*`) and its processing are LLaVA's; the speech side adds
`speech_encoder.*` (ESPnet's encoder names below it), `ctc.ctc_lo.*` and `speech_adapter.*`. The CTC head
predicts Llama token ids with id 0 (`<unk>`, never in a transcript) as the blank.

A checkpoint is one directory: config.json (`model_type: mm-multimodal`), model.safetensors, tokenizer.model,
preprocessor_config.json. `chat`, `caption` and `transcribe` stream text with `stream=True`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from decoders.checkpoint import CheckpointError, check_config_keys, read_hf_weights, read_json
from decoders.ctc import CTC, ctc_greedy_decode
from decoders.loss import next_token_loss
from encoders.speech_encoder import SpeechEncoder, SpeechEncoderConfig
from encoders.vit import ViTConfig

from mm.models.llava import (LlavaConfig, LlavaForConditionalGeneration, _load_image_processor, check_batch, stripped,
                             text_config)
from mm.models.processor import AUDIO_PLACEHOLDER, InputError, MultimodalProcessor
from mm.models.speech_adapter import (SpeechAdapter, SpeechAdapterConfig, encode_speech, encoder_lengths, fit_adapter,
                                      joint_beam_search, scatter_features)

MODEL_TYPE = "mm-multimodal"
CAPTION_PROMPT = "describe the image."
TRANSCRIBE_PROMPT = "transcribe the audio."


@dataclass
class MultimodalConfig(LlavaConfig):
    """LlavaConfig (ViT, projector, Llama, image token, template) + the speech path.

    audio_token_id: the id marking one speech feature in input_ids (beside image_token_index).
    ctc_weight: weight of the encoder's CTC loss in training. system: the template's system text (None: its own).
    max_audio_seconds: longest audio input accepted.
    """

    speech: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    adapter: SpeechAdapterConfig | None = None
    audio_token_id: int = 32001
    ctc_weight: float = 0.3
    system: str | None = None
    max_audio_seconds: float = 30.0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.speech, dict):
            self.speech = SpeechEncoderConfig.from_dict(self.speech)
        if isinstance(self.adapter, dict):
            check_config_keys(SpeechAdapterConfig, self.adapter)
            self.adapter = SpeechAdapterConfig(**self.adapter)
        try:
            self.adapter = fit_adapter(self.adapter, self.speech.encoder.output_size, self.text.hidden_size)
        except ValueError as e:
            raise ValueError(f"MultimodalConfig: speech {e}") from None
        if self.audio_token_id == self.image_token_index:
            raise ValueError(f"MultimodalConfig: audio_token_id and image_token_index are both {self.audio_token_id}")

    def to_dict(self) -> dict:
        """Our config.json."""
        d = super().to_dict()
        d.update(model_type=MODEL_TYPE, speech_config=self.speech.to_dict(), adapter=asdict(self.adapter))
        del d["speech"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MultimodalConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        d = dict(d)
        if d.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f"config is not model_type {MODEL_TYPE!r}")
        text, vision, speech = d.pop("text_config"), d.pop("vision_config"), d.pop("speech_config")
        check_config_keys(cls, d)
        return cls(text=text_config(text), vision=ViTConfig.from_dict(vision),
                   speech=SpeechEncoderConfig.from_dict(speech), **d)


DECODE_CTC_WEIGHT = {"ctc": 1.0, "attention": 0.0, "joint": 0.5, None: 0.5}  # CTC prefix weight in joint search


def check_decode(decode: str | None, option: str | None = None) -> None:
    """ValueError unless `decode` is a search the multimodal model has (a key of DECODE_CTC_WEIGHT); the message
    names the option as `option` (default: the keyword argument)."""
    if decode not in DECODE_CTC_WEIGHT:
        raise ValueError(f"{option or f'decode={decode!r}'}: the multimodal model decodes with ctc (its CTC head alone), "
                         "attention (its decoder alone) or joint (both, the default)")


@dataclass
class MultimodalOutput:
    """Logits [B, T, V] and, when targets were given, loss = lm_loss + ctc_weight * ctc_loss and its parts."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None


class MultimodalModel(LlavaForConditionalGeneration):
    """ViT + projector, E-Branchformer + CTC + speech adapter, one Llama: (input_ids, pixels, speech) -> logits."""

    def __init__(self, cfg: MultimodalConfig):
        super().__init__(cfg)
        self.speech_encoder = SpeechEncoder(cfg.speech)
        self.ctc = CTC(cfg.text.vocab_size, cfg.speech.encoder.output_size)
        self.speech_adapter = SpeechAdapter(cfg.adapter)

    def feature_lengths(self, speech_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens each utterance takes in the prompt (one per adapted feature), computed without the model."""
        return self.speech_adapter.output_lengths(encoder_lengths(self.speech_encoder, speech_lengths))

    def encode_speech(self, speech: torch.Tensor, speech_lengths: torch.Tensor):
        """speech [A, S] -> enc [A, T', d], enc_lengths [A], features [A, N, D], feature lengths [A]."""
        return encode_speech(self.speech_encoder, self.speech_adapter, speech.to(self.device), speech_lengths)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              speech_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder inputs [B, T, D]: image features at image tokens, (features [A, N, D], lengths [A]) at audio
        tokens, utterance after utterance in row-major order."""
        input_ids = input_ids.to(self.device)
        is_audio = input_ids == self.config.audio_token_id  # [B, T]
        n_slots = int(is_audio.sum())
        n_feats = 0 if speech_features is None else int(speech_features[1].sum())
        if n_slots != n_feats:
            raise ValueError(f"input_ids hold {n_slots} audio tokens (id {self.config.audio_token_id}) but the audio "
                             f"gives {n_feats} features; expand each '{AUDIO_PLACEHOLDER}' with the processor")
        h = super().embed(input_ids.masked_fill(is_audio, 0), pixel_values)  # [B, T, D]
        if speech_features is not None:
            h = scatter_features(h, is_audio, *speech_features)
        return h

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                speech: torch.Tensor | None = None, speech_lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ctc_targets: torch.Tensor | None = None, ctc_target_lengths: torch.Tensor | None = None,
                ctc_weight: float | None = None) -> MultimodalOutput:
        """Logits; with `labels` [B, T] (IGNORE_INDEX off the answers) the next-token loss, with transcripts as
        `ctc_targets` [A, L] (Llama ids, padded past `ctc_target_lengths`) the CTC loss on the A utterances."""
        enc = enc_lengths = feats = None
        if speech is not None:
            enc, enc_lengths, f, f_len = self.encode_speech(speech, speech_lengths)
            feats = (f, f_len)
        h = self.embed(input_ids, pixel_values, feats)
        mask = None if attention_mask is None else attention_mask.to(h.device)
        out = MultimodalOutput(self.language_model(attention_mask=mask, inputs_embeds=h))
        if labels is not None:
            out.lm_loss = next_token_loss(out.logits, labels.to(h.device))
        w = self.config.ctc_weight if ctc_weight is None else ctc_weight
        if ctc_targets is not None and w > 0:
            if enc is None:
                raise ValueError("ctc_targets need speech")
            ys = ctc_targets.to(enc.device)
            out.ctc_loss = self.ctc.loss(enc, enc_lengths, ys, torch.as_tensor(ctc_target_lengths, device=enc.device))
        parts = [p for p in (out.lm_loss, None if out.ctc_loss is None else w * out.ctc_loss) if p is not None]
        out.loss = sum(parts) if parts else None
        return out

    # ----------------------------------------------------------------------------------------- inference

    def processor(self, template: str | None = None) -> MultimodalProcessor:
        """A `MultimodalProcessor` for this model's tokenizer, image processor, token ids and template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its directory had no tokenizer.model); set model.tokenizer")
        cfg = self.config
        return MultimodalProcessor(self.tokenizer, self.image_processor, cfg.image_token_index,
                                   cfg.tokens_per_image(self.image_processor.crop_size), cfg.audio_token_id,
                                   self.feature_lengths, template or cfg.template, cfg.system, cfg.max_audio_seconds,
                                   cfg.speech.frontend.sample_rate)

    def inputs_embeds(self, input_ids, pixel_values=None, speech=None, speech_lengths=None) -> torch.Tensor:
        """The prompt's embeddings [B, T, D], image and speech features in their placeholders' slots (inference
        only): what generation, and `mm serve`'s batching engine, prefill from."""
        with torch.inference_mode():
            feats = None
            if speech is not None:
                _, _, f, f_len = self.encode_speech(speech, speech_lengths)
                feats = (f, f_len)
            return self.embed(input_ids, pixel_values, feats)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, *,
                 speech: torch.Tensor | None = None, speech_lengths: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Prompt followed by new tokens [B, T + new], as LLaVA's `generate`; `speech` [A, S] with `speech_lengths`
        [A] fills the audio tokens. Greedy by default, stopping at the tokenizer's stop ids (options as
        `decoders.generate.generate`)."""
        from decoders.generate import generate

        if "eos_token_id" not in kwargs and self.tokenizer is not None:
            kwargs["eos_token_id"] = sorted(self.tokenizer.stop_ids) or None
        h = self.inputs_embeds(input_ids, pixel_values, speech, speech_lengths)
        return generate(self.language_model, input_ids.to(self.device), attention_mask, max_new_tokens=max_new_tokens,
                        inputs_embeds=h, **kwargs)

    def stream_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, *, speech: torch.Tensor | None = None,
                      speech_lengths: torch.Tensor | None = None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the next token of every row [B] per step, as LLaVA's `stream_tokens`, with the audio of `speech`."""
        from decoders.generate import stream_tokens

        h = self.inputs_embeds(input_ids, pixel_values, speech, speech_lengths)
        yield from stream_tokens(self.language_model, input_ids.to(self.device), attention_mask, inputs_embeds=h,
                                 **kwargs)

    def _reply_tokens(self, inputs: dict, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """The new tokens [B, new] of `generate` for processor outputs."""
        ids = inputs["input_ids"]
        return self.generate(ids, inputs["pixel_values"], inputs["attention_mask"], max_new_tokens,
                             speech=inputs["speech"], speech_lengths=inputs["speech_lengths"], **kwargs)[:, ids.shape[1]:]

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Text of each row of new tokens, cut at the first stop token."""
        stops = set(self.tokenizer.stop_ids)
        texts = []
        for row in new_tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut]).strip())
        return texts

    def replies(self, rows: list[tuple[str, list, list]], batch_size: int = 32, max_new_tokens: int = 64,
                desc: str = "replies", progress: bool = True) -> list[str]:
        """Greedy replies to single-turn prompts (content with placeholders, images, audios), `batch_size` at a
        time, with a tqdm bar on stderr when `progress`."""
        processor = self.processor()
        out = []
        with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, file=sys.stderr, leave=False) as bar:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                convs = [[{"role": "user", "content": c}] for c, _, _ in chunk]
                inputs = processor(convs, [x for _, ims, _ in chunk for x in ims],
                                   [x for _, _, auds in chunk for x in auds])
                out += self.decode(self._reply_tokens(inputs, max_new_tokens))
                bar.update(len(chunk))
        return out

    def chat(self, messages, images=None, audios=None, stream: bool = False, max_new_tokens: int = 64,
             **kwargs) -> str | Iterator[str]:
        """The assistant's reply to a conversation (see `mm.models.processor` for the message format); with stream=True an
        iterator of text pieces as they are decoded. Options as `decoders.generate.stream_tokens`."""
        if isinstance(messages, (list, tuple)) and any(not isinstance(m, dict) for m in messages):
            k, m = next((k, m) for k, m in enumerate(messages) if not isinstance(m, dict))
            raise InputError(f"message {k} must be a dict with 'role' and 'content', got {m!r:.200}")
        inputs = self.processor()(messages, images, audios)
        if not stream:
            return self.decode(self._reply_tokens(inputs, max_new_tokens, **kwargs))[0]
        return self._stream(inputs, max_new_tokens, **kwargs)

    def _stream(self, inputs: dict, max_new_tokens: int, **kwargs) -> Iterator[str]:
        from decoders.generate import stream_text

        h = self.inputs_embeds(inputs["input_ids"], inputs["pixel_values"], inputs["speech"], inputs["speech_lengths"])
        yield from stripped(stream_text(self.language_model, self.tokenizer, inputs["input_ids"].to(self.device),
                                        attention_mask=inputs["attention_mask"], inputs_embeds=h,
                                        max_new_tokens=max_new_tokens, **kwargs))

    def captions(self, images, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                 progress: bool | None = None) -> list[str]:
        """Greedy captions of images (PIL images or paths), `batch_size` at a time (see LLaVA's `captions`)."""
        images = check_batch(images, batch_size)
        show = len(images) > batch_size if progress is None else progress
        content = "<image>\n" + (prompt or CAPTION_PROMPT)
        return self.replies([(content, [im], []) for im in images], batch_size, max_new_tokens, "captioning", show)

    def caption(self, image, prompt: str | None = None, stream: bool = False, max_new_tokens: int = 64):
        """Caption of one image (PIL image, path or bytes)."""
        content = [{"type": "image", "image": image}, {"type": "text", "text": "\n" + (prompt or CAPTION_PROMPT)}]
        return self.chat([{"role": "user", "content": content}], stream=stream, max_new_tokens=max_new_tokens)

    def transcribe(self, audio, stream: bool = False, max_new_tokens: int = 96, ctc_weight: float = 0.5,
                   beam_size: int = 4):
        """Transcript of one utterance (path, (waveform, sampling_rate) or a tensor at the model's rate).

        ctc_weight > 0: joint CTC/LLM beam search (`mm.models.speech_adapter.joint_beam_search`), the decoder's scores
        joined with the CTC head's prefix scores, as ESPnet/Dolphin decode; the text then comes whole (stream=True
        yields it once). ctc_weight=0: the decoder alone, greedy, streamed token by token."""
        if ctc_weight <= 0:
            return self.chat(_transcribe_messages(audio), stream=stream, max_new_tokens=max_new_tokens)
        ids, _, _ = self._joint_transcribe(audio, max_new_tokens, ctc_weight, beam_size)
        text = self.tokenizer.decode(ids).strip()
        return iter([text]) if stream else text

    @torch.inference_mode()
    @torch.inference_mode()
    def joint_search(self, inputs: dict, max_new_tokens: int = 96, ctc_weight: float = 0.5, beam_size: int = 4,
                     eos_token_id: int | None = None, **kwargs):
        """Joint CTC/LLM beam search (`mm.models.speech_adapter.joint_beam_search`) for model inputs with one
        utterance per row (`input_ids` with expanded audio tokens, `attention_mask`, `speech`, `speech_lengths`,
        optionally `pixel_values`): the encoder runs once, its CTC posteriors score prefixes and its adapted features
        fill the prompt. Returns (n-best hypotheses per row, CTC log-probs [B, T', V], their lengths [B])."""
        enc, enc_lengths, f, f_len = self.encode_speech(inputs["speech"], inputs["speech_lengths"])
        h = self.embed(inputs["input_ids"], inputs.get("pixel_values"), (f, f_len))
        log_probs = self.ctc.log_softmax(enc)  # [B, T', V]
        mask = inputs.get("attention_mask")
        hyps = joint_beam_search(self.language_model, h, None if mask is None else mask.to(self.device), log_probs,
                                 enc_lengths, eos_token_id=self.tokenizer.eos_id if eos_token_id is None else eos_token_id,
                                 beam_size=beam_size, ctc_weight=ctc_weight, max_new_tokens=max_new_tokens, **kwargs)
        return hyps, log_probs, enc_lengths

    def _joint_transcribe(self, audio, max_new_tokens: int, ctc_weight: float, beam_size: int):
        """(best token ids, CTC log-probs [T', V] of the utterance, its length in samples)."""
        inputs = self.processor()(_transcribe_messages(audio))
        hyps, log_probs, enc_lengths = self.joint_search(inputs, max_new_tokens, ctc_weight, beam_size)
        return hyps[0][0].tokens, log_probs[0, : int(enc_lengths[0])], int(inputs["speech_lengths"][0])

    @torch.inference_mode()
    def transcript(self, audio, source: str | None = None, max_new_tokens: int = 96, ctc_weight: float | None = None,
                   beam_size: int = 4, progress: bool = False, decode: str | None = None, beam: int | None = None):
        """`mm.models.transcript.Transcript` of a recording: the text of `transcribe`, and word times from a CTC forced
        alignment of its tokens on the encoder's CTC posteriors (words the alignment cannot place get none).

        A recording longer than `max_audio_seconds` is cut into its speech runs (the energy VAD of the ESPnet/Dolphin
        path, `mm.models.vad.speech_windows`, without packing runs together: the model learnt single utterances), at
        most that long each, decoded one after the other (a tqdm bar when `progress`), one Segment each with times in
        the recording; the silence between them is not decoded.
        decode / beam: as the ESPnet/Dolphin model's `transcript`: "ctc" (the CTC head alone), "attention" (the decoder
        alone), "joint" (both; the default), i.e. a CTC weight of 1, 0 or 0.5 (`ctc_weight` sets it directly)."""
        check_decode(decode)
        ctc_weight = DECODE_CTC_WEIGHT[decode] if ctc_weight is None else ctc_weight
        beam_size = beam or beam_size
        from mm.models.transcript import Transcript
        from mm.models.vad import speech_windows

        rate = self.config.speech.frontend.sample_rate
        wave = self.processor().load_audio(audio, whole=True)  # [S]
        if wave.numel() <= self.config.max_audio_seconds * rate:
            windows = [(0, wave.numel())]
        else:
            windows = speech_windows(wave, rate, max_window=self.config.max_audio_seconds, pack=False)
        segments = [self._segment(wave[s:e], s / rate, max_new_tokens, ctc_weight, beam_size)
                    for s, e in tqdm(windows, desc="transcribing", unit="window", disable=not progress, file=sys.stderr)]
        text = " ".join(sg.text for sg in segments if sg.text)
        return Transcript(text, [t for sg in segments for t in sg.tokens], [i for sg in segments for i in sg.token_ids],
                          segments, wave.numel() / rate, source=source)

    def _segment(self, wave: torch.Tensor, offset: float, max_new_tokens: int, ctc_weight: float, beam_size: int):
        """The Segment of one window wave [S] that starts `offset` seconds into the recording."""
        from decoders.ctc import ctc_forced_align

        from mm.models.transcript import Segment, timed_words

        rate = self.config.speech.frontend.sample_rate
        ids, log_probs, n_samples = self._joint_transcribe((wave, rate), max_new_tokens, ctc_weight, beam_size)
        try:
            spans = ctc_forced_align(log_probs, ids) if ids else []
        except ValueError:  # more tokens than frames
            spans = []
        pieces = [self.tokenizer.sp.id_to_piece(i) for i in ids]
        groups = []
        for i, piece, span in zip(ids, pieces, spans):
            if piece.startswith("\u2581") or not groups:
                groups.append([])
            groups[-1].append((i, span))
        words = timed_words(groups, self.tokenizer.decode, self.config.speech.frame_shift, offset)
        end = offset + n_samples / rate
        return Segment(round(offset, 3), round(end, 3), self.tokenizer.decode(ids).strip(), pieces, ids, words)

    @torch.inference_mode()
    def ctc_transcribe(self, audio) -> str:
        """Greedy CTC transcript of one utterance from the encoder alone (no decoder)."""
        wave = self.processor().load_audio(audio)
        enc, enc_lengths, _, _ = self.encode_speech(wave[None], torch.tensor([wave.shape[0]]))
        return self.tokenizer.decode(ctc_greedy_decode(self.ctc.log_softmax(enc), enc_lengths)[0]).strip()

    # ----------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "MultimodalModel":
        """Load our directory (config.json, model.safetensors, tokenizer.model, preprocessor_config.json)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory")
        raw = read_json(path / "config.json")
        try:
            cfg = MultimodalConfig.from_dict(raw)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        model = cls.from_state_dict(cfg, read_hf_weights(path), dtype, device, source=str(path))
        model.image_processor = _load_image_processor(path, cfg, "crop")
        if (path / "tokenizer.model").is_file():
            from decoders.tokenizer import load_tokenizer

            model.tokenizer = load_tokenizer(path)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json, model.safetensors, tokenizer.model (if any) and preprocessor_config.json."""
        super().save_pretrained(path)
        (Path(path) / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))


def _transcribe_messages(audio) -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                         {"type": "text", "text": "\n" + TRANSCRIBE_PROMPT}]}]


