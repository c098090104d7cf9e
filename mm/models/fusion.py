"""One early-fusion model (as torchtune's EarlyFusionModel): a decoder from `decoders/` and a set of modalities
whose encoders' adapted features take the places of their placeholder tokens in the decoder's input embeddings.

    image [3, H, W] -> ViT -> projector (LLaVA's MLP) ---------------------\\
                                                                            +-> features at <image>/<audio> token
    audio [S] -> log-mel -> 4x conv -> E-Branchformer -> speech adapter ---/    slots -> Llama/DeepSeek -> text
                                                    \\-> CTC head (training loss; joint decoding, word times)

Each modality is there when its config is (`FusionConfig.vision` / `.speech`); weight names: `vision_tower.*`,
`projector.*` (image), `speech_encoder.*` (ESPnet's encoder names below it), `ctc.ctc_lo.*`, `speech_adapter.*`
(speech), `language_model.*` (the decoder). The CTC head predicts the decoder's token ids, id 0 as the blank.
Every model has the same `generate` / `stream_tokens` / `chat` / `caption` / `captions` / `transcribe`; asking for
a modality the model lacks is a clear ValueError. Checkpoints (`from_pretrained`): llava-hf (both key layouts) and
original LLaVA (image only, see `mm.models.convert_llava`), our `mm-llava` (image) and `mm-multimodal` (image +
speech) directories: config.json, model.safetensors, tokenizer.model, preprocessor_config.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from decoders.checkpoint import build_from_state_dict, write_hf_weights
from decoders.ctc import CTC
from decoders.deepseek import DeepseekConfig, DeepseekForCausalLM
from decoders.generate import generate, stream_text, stream_tokens
from decoders.llama import LlamaForCausalLM
from decoders.loss import next_token_loss
from encoders.image import ImageProcessor
from encoders.speech_encoder import SpeechEncoder
from encoders.vit import ViT
from mm.models.fusion_config import PROJECTOR_ACTS, FusionConfig, read_checkpoint
from mm.models.fusion_speech import SpeechInference
from mm.models.processor import AUDIO_PLACEHOLDER, InputError, MultimodalProcessor
from mm.models.speech_adapter import SpeechAdapter, encode_speech, encoder_lengths, scatter_features

DEFAULT_PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA-1.5's short-caption prompt
CAPTION_PROMPT = "describe the image."  # our recipe's caption prompt


def stripped(pieces: Iterator[str]) -> Iterator[str]:
    """Text pieces whose concatenation is `"".join(pieces).strip()`, as `chat` returns the whole reply: leading
    whitespace is dropped, trailing whitespace held back until more text follows it."""
    started, held = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield held + body
            held = piece[len(body):]
        else:
            held += piece


def check_batch(images, batch_size: int) -> list:
    """The images as a list, after checking the batch size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(images)


class Projector(nn.Module):
    """The LLaVA adapter: `mlp2x_gelu` = linear_1 -> act -> linear_2, or `linear` = linear_1 only."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        d = cfg.text.hidden_size
        self.linear_1 = nn.Linear(cfg.feature_dim, d, bias=cfg.projector_bias)
        self.act = PROJECTOR_ACTS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias) if cfg.projector_type == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(self.act(x))


@dataclass
class FusionOutput:
    """Logits [B, T, V] and, when targets were given, loss = lm_loss + ctc_weight * ctc_loss and its parts."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    ctc_loss: torch.Tensor | None = None


class FusionModel(SpeechInference, nn.Module):
    """A decoder and its modalities: (input_ids with placeholder tokens, pixel_values, speech) -> FusionOutput
    (`.logits` [B, T, V], and the losses when targets are given)."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.config = cfg
        if cfg.vision is not None:
            self.vision_tower = ViT(cfg.vision)
            self.projector = Projector(cfg)
        self.language_model = (DeepseekForCausalLM if isinstance(cfg.text, DeepseekConfig) else LlamaForCausalLM)(cfg.text)
        if cfg.speech is not None:
            self.speech_encoder = SpeechEncoder(cfg.speech)
            self.ctc = CTC(cfg.text.vocab_size, cfg.speech.encoder.output_size)
            self.speech_adapter = SpeechAdapter(cfg.adapter)
        self.tokenizer = None  # set by from_pretrained when the directory has a tokenizer
        self.image_processor = (None if cfg.vision is None else
                                ImageProcessor(size=cfg.vision.image_size, crop_size=cfg.vision.image_size))

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def modalities(self) -> tuple[str, ...]:
        """"image", "speech" or both."""
        return self.config.modalities

    def need(self, modality: str, task: str) -> None:
        """ValueError unless the model has `modality`, saying it cannot do `task`."""
        if modality not in self.modalities:
            what = {"image": "vision tower", "speech": "speech encoder"}[modality]
            kind = "LLaVA" if self.modalities == ("image",) else "speech-only"
            raise ValueError(f"this {kind} model has no {what}, so it cannot {task}; the multimodal model (mm.load()) "
                             f"{'or an ESPnet/Dolphin experiment ' if modality == 'speech' else ''}can")

    # ------------------------------------------------------------------------------------------- encoders

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features [N, P, D_text] of images [N, 3, H, W]."""
        self.need("image", "see images")
        cfg = self.config
        hidden = self.vision_tower.hidden_states(pixel_values.to(self.vision_tower.pos_embed.device), cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, cfg.vision.num_prefix_tokens:] for h in hidden]  # drop CLS
        if cfg.vision_feature_norm:
            hidden = [self.vision_tower.norm(h) for h in hidden]
        x = torch.cat(hidden, dim=-1)  # [N, P, D_vision * layers]
        return self.projector(x.to(self.dtype))  # the decoder's dtype (a quantized projector has no .weight)

    def feature_lengths(self, speech_lengths: torch.Tensor) -> torch.Tensor:
        """Audio tokens each utterance takes in the prompt (one per adapted feature), computed without the model."""
        self.need("speech", "hear audio")
        return self.speech_adapter.output_lengths(encoder_lengths(self.speech_encoder, speech_lengths))

    def encode_speech(self, speech: torch.Tensor, speech_lengths: torch.Tensor):
        """speech [A, S] -> enc [A, T', d], enc_lengths [A], features [A, N, D], feature lengths [A]."""
        self.need("speech", "hear audio")
        return encode_speech(self.speech_encoder, self.speech_adapter, speech.to(self.device), speech_lengths)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              speech_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Decoder input embeddings [B, T, D]: token embeddings with image features at the image tokens and speech
        (features [A, N, D], lengths [A]) at the audio tokens, item after item in row-major order."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        cfg = self.config
        input_ids = input_ids.to(self.device)
        none = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, T]
        is_image = none if cfg.vision is None else input_ids == cfg.image_token_index
        is_audio = none if cfg.speech is None else input_ids == cfg.audio_token_id
        n_images, per_image = 0, 0
        if pixel_values is not None:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be [images, 3, height, width], got shape {tuple(pixel_values.shape)}")
            n_images, per_image = pixel_values.shape[0], cfg.tokens_per_image(tuple(pixel_values.shape[-2:]))
        if int(is_image.sum()) != n_images * per_image:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image tokens (id {cfg.image_token_index}) but pixel_values give "
                f"{n_images} image(s) x {per_image} features = {n_images * per_image}; each image needs exactly "
                f"{per_image} image tokens (use the processor to expand '<image>' placeholders)")
        n_feats = 0 if speech_features is None else int(speech_features[1].sum())
        if int(is_audio.sum()) != n_feats:
            raise ValueError(f"input_ids hold {int(is_audio.sum())} audio tokens (id {cfg.audio_token_id}) but the "
                             f"audio gives {n_feats} features; expand each '{AUDIO_PLACEHOLDER}' with the processor")
        # The placeholder ids may lie beyond the text vocabulary; those rows are overwritten below anyway.
        h = self.language_model.embed(input_ids.masked_fill(is_image | is_audio, 0))  # [B, T, D]
        if n_images:
            features = self.image_features(pixel_values).to(h.dtype)  # [N, P, D]
            h = h.masked_scatter(is_image.unsqueeze(-1).to(h.device), features)  # image after image, row-major
        if speech_features is not None:
            h = scatter_features(h, is_audio, *speech_features)
        return h

    def inputs_embeds(self, input_ids, pixel_values=None, speech=None, speech_lengths=None) -> torch.Tensor:
        """The prompt's embeddings [B, T, D], image and speech features in their placeholders' slots (inference
        only): what generation, and `mm serve`'s batching engine, prefill from."""
        with torch.inference_mode():
            feats = None
            if speech is not None:
                _, _, f, f_len = self.encode_speech(speech, speech_lengths)
                feats = (f, f_len)
            return self.embed(input_ids, pixel_values, feats)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, speech: torch.Tensor | None = None,
                speech_lengths: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ctc_targets: torch.Tensor | None = None, ctc_target_lengths: torch.Tensor | None = None,
                ctc_weight: float | None = None) -> FusionOutput:
        """`.logits` [B, T, V] (`input_ids` hold one placeholder token per image or speech feature, in order); with
        `labels` [B, T] (IGNORE_INDEX off the answers) the next-token loss, with transcripts as `ctc_targets` [A, L]
        (decoder ids, padded past `ctc_target_lengths`) the CTC loss on the A utterances."""
        enc = enc_lengths = feats = None
        if speech is not None:
            enc, enc_lengths, f, f_len = self.encode_speech(speech, speech_lengths)
            feats = (f, f_len)
        h = self.embed(input_ids, pixel_values, feats)
        mask = None if attention_mask is None else attention_mask.to(h.device)
        out = FusionOutput(self.language_model(attention_mask=mask, inputs_embeds=h))
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

    # ------------------------------------------------------------------------------------------- generation

    def stops(self) -> list[int]:
        """Ids that end a reply: the tokenizer's stop ids and its EOS (none without a tokenizer)."""
        tok = self.tokenizer
        return [] if tok is None else sorted(set(tok.stop_ids) | ({tok.eos_id} - {None}))

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, *,
                 speech: torch.Tensor | None = None, speech_lengths: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Prompt followed by new tokens [B, T + new]; `speech` [A, S] with `speech_lengths` [A] fills the audio
        tokens. Greedy by default, stopping at the tokenizer's stop ids (options as `decoders.generate.generate`)."""
        if "eos_token_id" not in kwargs and self.tokenizer is not None:
            kwargs["eos_token_id"] = self.stops() or None
        h = self.inputs_embeds(input_ids, pixel_values, speech, speech_lengths)
        return generate(self.language_model, input_ids.to(self.device), attention_mask, max_new_tokens=max_new_tokens,
                        inputs_embeds=h, **kwargs)

    def stream_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, *, speech: torch.Tensor | None = None,
                      speech_lengths: torch.Tensor | None = None, **kwargs) -> Iterator[torch.Tensor]:
        """Yield the next token of every row [B] per step (options as `decoders.generate.stream_tokens`)."""
        h = self.inputs_embeds(input_ids, pixel_values, speech, speech_lengths)
        yield from stream_tokens(self.language_model, input_ids.to(self.device), attention_mask, inputs_embeds=h,
                                 **kwargs)

    def processor(self, template: str | None = None) -> MultimodalProcessor:
        """A `MultimodalProcessor` for this model's tokenizer, image processor, modalities and template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its directory had no tokenizer.model); set model.tokenizer")
        cfg = self.config
        hears = cfg.speech is not None
        return MultimodalProcessor(
            self.tokenizer, self.image_processor, cfg.image_token_index,
            None if cfg.vision is None else cfg.tokens_per_image(self.image_processor.crop_size),
            template or cfg.template, cfg.system, audio_token_id=cfg.audio_token_id if hears else None,
            audio_feature_lengths=self.feature_lengths if hears else None, max_audio_seconds=cfg.max_audio_seconds,
            sample_rate=cfg.speech.frontend.sample_rate if hears else 16000)

    def _reply_tokens(self, inputs: dict, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """The new tokens [B, new] of `generate` for processor outputs."""
        ids = inputs["input_ids"]
        return self.generate(ids, inputs["pixel_values"], inputs["attention_mask"], max_new_tokens,
                             speech=inputs["speech"], speech_lengths=inputs["speech_lengths"], **kwargs)[:, ids.shape[1]:]

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Text of each row of new tokens, cut at the first stop token."""
        stops = set(self.stops())
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
        """The assistant's reply to a conversation (see `mm.models.processor` for the message format: text with
        `<image>` / `<audio>` placeholders taking `images` / `audios` in order, or content parts); greedy unless
        sampling options are given (as `decoders.generate.stream_tokens`); with stream=True an iterator of text
        pieces as they are decoded."""
        if isinstance(messages, (list, tuple)) and any(not isinstance(m, dict) for m in messages):
            k, m = next((k, m) for k, m in enumerate(messages) if not isinstance(m, dict))
            raise InputError(f"message {k} must be a dict with 'role' and 'content', got {m!r:.200}")
        inputs = self.processor()(messages, images, audios)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("chat takes one conversation; use captions(), replies() or generate() for batches")
        if not stream:
            return self.decode(self._reply_tokens(inputs, max_new_tokens, **kwargs))[0]
        return self._stream(inputs, max_new_tokens, **kwargs)

    def _stream(self, inputs: dict, max_new_tokens: int, **kwargs) -> Iterator[str]:
        h = self.inputs_embeds(inputs["input_ids"], inputs["pixel_values"], inputs["speech"], inputs["speech_lengths"])
        kwargs.setdefault("eos_token_id", self.stops() or None)
        yield from stripped(stream_text(self.language_model, self.tokenizer, inputs["input_ids"].to(self.device),
                                        attention_mask=inputs["attention_mask"], inputs_embeds=h,
                                        max_new_tokens=max_new_tokens, **kwargs))

    @property
    def caption_prompt(self) -> str:
        """The default caption question: our recipe's (it trains every speech model) or LLaVA-1.5's."""
        return CAPTION_PROMPT if self.config.speech is not None else DEFAULT_PROMPT

    def captions(self, images, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                 progress: bool | None = None) -> list[str]:
        """Greedy captions of images (PIL images, paths or bytes), `batch_size` at a time; a tqdm bar on stderr
        when `progress` (default: when there is more than one batch)."""
        self.need("image", "caption")
        images = check_batch(images, batch_size)
        show = len(images) > batch_size if progress is None else progress
        content = "<image>\n" + (prompt or self.caption_prompt)
        return self.replies([(content, [im], []) for im in images], batch_size, max_new_tokens, "captioning", show)

    def caption(self, image, prompt: str | None = None, stream: bool = False, max_new_tokens: int = 64):
        """Caption of one image (PIL image, path or bytes); with stream=True an iterator of text pieces."""
        self.need("image", "caption")
        content = [{"type": "image", "image": image}, {"type": "text", "text": "\n" + (prompt or self.caption_prompt)}]
        return self.chat([{"role": "user", "content": content}], stream=stream, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_state_dict(cls, cfg: FusionConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                        device="cpu", source: str = "state dict") -> "FusionModel":
        """Build a model from one of our state dicts without a throwaway random initialisation."""
        return build_from_state_dict(lambda: cls(cfg), state_dict, source, dtype, device)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        vision_tower: str | Path | None = None) -> "FusionModel":
        """Load a llava-hf, original LLaVA or our own directory (see the module docstring); attaches tokenizer and
        image processor when the directory has them. `vision_tower`: CLIP directory for original LLaVA checkpoints."""
        path = Path(path)
        cfg, sd, model_image_processor = read_checkpoint(path, vision_tower)
        model = cls.from_state_dict(cfg, sd, dtype, device, source=str(path))
        if model_image_processor is not None:
            model.image_processor = model_image_processor
        if (path / "tokenizer.model").is_file():
            from decoders.tokenizer import load_tokenizer

            model.tokenizer = load_tokenizer(path)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Write our format: config.json, model.safetensors, tokenizer.model (if any), preprocessor_config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        write_hf_weights(path, self.state_dict())
        if self.image_processor is not None:
            (path / "preprocessor_config.json").write_text(
                json.dumps({"image_processor_type": "mm.ImageProcessor", **self.image_processor.to_dict()}, indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save(path)

