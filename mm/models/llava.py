"""LLaVA (Liu et al. 2023, arXiv 2304.08485 / 2310.03744): a ViT's patch features, projected by a small MLP into
the decoder's embedding space, take the place of the image tokens of a Llama prompt.

One image flows through: pixels [N, 3, H, W] -> ViT hidden state(s) of `vision_feature_layer` (no final norm)
-> drop CLS ("default") or keep it ("full") -> projector (`mlp2x_gelu`: Linear -> GELU -> Linear, or `linear`)
-> features [N, P, D] scattered, in order, into the positions of `input_ids` that hold `image_token_index`
(one token per feature, as transformers does) -> Llama decoder -> logits.

Checkpoints read by `LlavaForConditionalGeneration.from_pretrained` (one directory, told apart by config.json):
  * llava-hf (`model_type: llava`), both key layouts: older `language_model.model.*`, `language_model.lm_head.weight`,
    `vision_tower.[vision_model.]*`, `multi_modal_projector.*` (what transformers 5 still writes) and newer
    `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.weight`.
    CLIP vision towers only (SigLIP and other towers raise).
  * original LLaVA (haotian-liu, `model_type: llava_llama` / `mm_projector_type`): Llama keys `model.*` and
    `lm_head.weight` plus `model.mm_projector.{0,2}` (mlp2x_gelu) or `model.mm_projector` (linear). Those
    checkpoints name their CLIP tower (`mm_vision_tower`) instead of holding it: pass `vision_tower=DIR` (an HF
    CLIPVisionModel / CLIPModel directory), or let `mm_vision_tower` be such a directory (absolute or relative
    to the checkpoint). Tower weights saved inside (`model.vision_tower.vision_tower.*`) are used when present;
    their config then comes from that directory or, for the OpenAI CLIP-L towers, from their known shape.
    `mm_use_im_start_end` / `mm_use_im_patch_token` are not supported.
  * our own format (`model_type: mm-llava`), written by `save_pretrained`: config.json, model.safetensors with
    this module's parameter names, tokenizer.model, preprocessor_config.json.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from decoders.checkpoint import CheckpointError, build_from_state_dict, check_config_keys, read_hf_weights, read_json, write_hf_weights
from decoders.deepseek import MODEL_TYPES as MOE_TYPES, DeepseekConfig, DeepseekForCausalLM
from decoders.llama import LlamaConfig, LlamaForCausalLM
from encoders.image import ImageProcessor
from encoders.vit import ViT, ViTConfig, quick_gelu
from mm.models.conversation import LlavaProcessor, user_prompt
from mm.models.convert_llava import (LLAVA_VISION_DEFAULTS, convert_hf_llava_state_dict, convert_original_llava_state_dict,
                                     original_vision_tower)

OUR_MODEL_TYPE = "mm-llava"
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
PROJECTOR_ACTS = {
    "gelu": F.gelu,  # exact erf GELU, transformers' ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}
DEFAULT_PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA-1.5's short-caption prompt


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


def text_config(d: dict) -> LlamaConfig | DeepseekConfig:
    """The decoder's config from a `text_config` dict: DeepSeek-V2/V3 or Mixtral by its model_type, else Llama."""
    return DeepseekConfig.from_hf(d) if d.get("model_type") in MOE_TYPES else LlamaConfig.from_hf(d)


def check_batch(images, batch_size: int) -> list:
    """The images as a list, after checking the batch size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return list(images)


@dataclass
class LlavaConfig:
    """A LLaVA model: ViT config + Llama config + how image features reach the decoder.

    vision_feature_layer: ViT hidden state(s) to take (HF indexing, 0 = embeddings, -2 = before the last block);
        a list concatenates the layers on the channel dim.
    vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
    vision_feature_norm: pass the selected features through the ViT's final LayerNorm first (SigLIP/PaliGemma
        style; keeps a tower trained from scratch at unit scale). LLaVA's CLIP towers: False.
    image_token_index: the id marking one image feature in input_ids; it may lie just beyond the text vocabulary.
    template: the conversation template of `mm.models.conversation` the model was tuned with.
    """

    text: LlamaConfig | DeepseekConfig = field(default_factory=LlamaConfig)  # the decoder: Llama or DeepSeek/Mixtral
    vision: ViTConfig = field(default_factory=lambda: ViTConfig.from_hf_clip_vision(LLAVA_VISION_DEFAULTS))
    image_token_index: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    vision_feature_norm: bool = False
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    template: str = "llava_v1"

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = text_config(self.text)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig.from_dict(self.vision)
        if isinstance(self.vision_feature_layer, (list, tuple)):
            self.vision_feature_layer = [int(i) for i in self.vision_feature_layer]
            if not self.vision_feature_layer:
                raise ValueError("LlavaConfig: vision_feature_layer is an empty list")
        n = self.vision.depth + 1
        for i in self.feature_layers:
            if not -n <= i < n:
                raise ValueError(f"LlavaConfig: vision_feature_layer {i} is out of range for a ViT of "
                                 f"{self.vision.depth} blocks (valid {-n}..{n - 1})")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"LlavaConfig: vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"LlavaConfig: projector type {self.projector_type!r} is not supported {PROJECTOR_TYPES}")
        if self.projector_hidden_act not in PROJECTOR_ACTS:
            raise ValueError(f"LlavaConfig: projector_hidden_act {self.projector_hidden_act!r} is not supported "
                             f"{sorted(PROJECTOR_ACTS)}")
        if self.image_token_index < 0:
            raise ValueError(f"LlavaConfig: image_token_index must be >= 0, got {self.image_token_index}")

    @property
    def feature_layers(self) -> list[int]:
        """vision_feature_layer as a list."""
        v = self.vision_feature_layer
        return [v] if isinstance(v, int) else list(v)

    @property
    def feature_dim(self) -> int:
        """Width of the projector's input: ViT width times the number of feature layers."""
        return self.vision.dim * len(self.feature_layers)

    def tokens_per_image(self, image_size: int | tuple[int, int] | None = None) -> int:
        """Image tokens one image takes in input_ids: patches (+ CLS for "full"); 576 for 336/14 "default"."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else (image_size or (self.vision.image_size,) * 2)
        p = self.vision.patch_size
        full = self.vision_feature_select_strategy == "full" and self.vision.class_token
        return (h // p) * (w // p) + int(full)

    def to_dict(self) -> dict:
        """Our config.json."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("text", "vision")}
        return {"model_type": OUR_MODEL_TYPE, **d, "text_config": self.text.to_hf(), "vision_config": self.vision.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        """Inverse of `to_dict`."""
        d = dict(d)
        if d.pop("model_type", None) != OUR_MODEL_TYPE:
            raise ValueError(f"config is not model_type {OUR_MODEL_TYPE!r}")
        text, vision = d.pop("text_config"), d.pop("vision_config")
        check_config_keys(cls, d)
        return cls(text=text_config(text), vision=ViTConfig.from_dict(vision), **d)

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        """From a llava-hf `config.json` dict (transformers `LlavaConfig`)."""
        if d.get("model_type") != "llava":
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'llava'")
        vision = d.get("vision_config") or dict(LLAVA_VISION_DEFAULTS, model_type="clip_vision_model")
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"vision_config model_type {vision.get('model_type')!r} is not supported (clip_vision_model)")
        text = dict(d.get("text_config") or {"model_type": "llama"})
        if d.get("tie_word_embeddings"):
            text["tie_word_embeddings"] = True
        return cls(
            text=LlamaConfig.from_hf(text),
            vision=ViTConfig.from_hf_clip_vision(vision),
            image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
            vision_feature_layer=d.get("vision_feature_layer", -2),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_type="mlp2x_gelu",
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=d.get("multimodal_projector_bias", True),
        )

    @classmethod
    def from_original(cls, d: dict, vision: ViTConfig) -> "LlavaConfig":
        """From an original LLaVA (`llava_llama`) config.json dict and the config of its CLIP tower."""
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if d.get(flag):
                raise ValueError(f"original LLaVA config sets {flag}=true, which is not supported")
        select = d.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"original LLaVA config: mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
        text = LlamaConfig.from_hf(dict(d, model_type="llama"))
        if d.get("mm_hidden_size", vision.dim) != vision.dim:
            raise ValueError(f"original LLaVA config: mm_hidden_size {d['mm_hidden_size']} differs from the vision "
                             f"tower's width {vision.dim}")
        return cls(
            text=text, vision=vision,
            image_token_index=text.vocab_size,  # original LLaVA splices features in by position (its id is -200)
            vision_feature_layer=d.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy="full" if select == "cls_patch" else "default",
            projector_type=d.get("mm_projector_type", "linear"),  # LLaVA's default before 1.5 added the MLP
        )


class Projector(nn.Module):
    """The LLaVA adapter: `mlp2x_gelu` = linear_1 -> act -> linear_2, or `linear` = linear_1 only."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        d = cfg.text.hidden_size
        self.linear_1 = nn.Linear(cfg.feature_dim, d, bias=cfg.projector_bias)
        self.act = PROJECTOR_ACTS[cfg.projector_hidden_act]
        self.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias) if cfg.projector_type == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(self.act(x))


class LlavaForConditionalGeneration(nn.Module):
    """ViT + projector + Llama decoder: (input_ids with image tokens, pixel_values) -> logits [B, T, V]."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = ViT(cfg.vision)
        self.projector = Projector(cfg)
        self.language_model = (DeepseekForCausalLM if isinstance(cfg.text, DeepseekConfig) else LlamaForCausalLM)(cfg.text)
        self.tokenizer = None  # set by from_pretrained when the directory has tokenizer.model
        self.image_processor = ImageProcessor(size=cfg.vision.image_size, crop_size=cfg.vision.image_size)

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features [N, P, D_text] of images [N, 3, H, W]."""
        cfg = self.config
        hidden = self.vision_tower.hidden_states(pixel_values.to(self.vision_tower.pos_embed.device), cfg.feature_layers)
        if cfg.vision_feature_select_strategy == "default":
            hidden = [h[:, cfg.vision.num_prefix_tokens:] for h in hidden]  # drop CLS
        if cfg.vision_feature_norm:
            hidden = [self.vision_tower.norm(h) for h in hidden]
        x = torch.cat(hidden, dim=-1)  # [N, P, D_vision * layers]
        return self.projector(x.to(self.projector.linear_1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder input embeddings [B, T, D]: token embeddings with image features at the image-token positions."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        is_image = input_ids == self.config.image_token_index  # [B, T]
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            n_images, per_image = 0, 0
        else:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be [images, 3, height, width], got shape {tuple(pixel_values.shape)}")
            n_images, per_image = pixel_values.shape[0], self.config.tokens_per_image(tuple(pixel_values.shape[-2:]))
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index}) but pixel_values give "
                f"{n_images} image(s) x {per_image} features = {n_images * per_image}; each image needs exactly "
                f"{per_image} image tokens (use the processor to expand '<image>' placeholders)"
            )
        # The image id may lie beyond the text vocabulary; those rows are overwritten below anyway.
        h = self.language_model.embed(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        if n_images:
            features = self.image_features(pixel_values).to(h.dtype)  # [N, P, D]
            h = h.masked_scatter(is_image.unsqueeze(-1).to(h.device), features)  # image after image, row-major
        return h

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]; `input_ids` hold one image token per image feature, images in order."""
        h = self.embed(input_ids, pixel_values)
        mask = None if attention_mask is None else attention_mask.to(h.device)
        return self.language_model(attention_mask=mask, inputs_embeds=h)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Prompt followed by new tokens [B, T + new]; options as `decoders.generate.generate` (greedy by default)."""
        from decoders.generate import generate

        h = self.embed(input_ids.to(self.device), pixel_values)
        return generate(self.language_model, input_ids.to(self.device), attention_mask, max_new_tokens=max_new_tokens,
                        inputs_embeds=h, **kwargs)

    def stream_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, **kwargs):
        """Yield the next token of every row [B] per step (options as `decoders.generate.stream_tokens`)."""
        from decoders.generate import stream_tokens

        with torch.inference_mode():
            h = self.embed(input_ids.to(self.device), pixel_values)
        yield from stream_tokens(self.language_model, input_ids.to(self.device), attention_mask, inputs_embeds=h, **kwargs)

    def processor(self, template: str | None = None):
        """A `mm.models.conversation.LlavaProcessor` for this model's tokenizer, image processor and template."""
        if self.tokenizer is None:
            raise ValueError("this LLaVA model has no tokenizer (its directory had no tokenizer.model); set model.tokenizer")
        return LlavaProcessor(self.tokenizer, self.image_processor, self.config.image_token_index,
                              self.config.tokens_per_image(self.image_processor.crop_size),
                              template or self.config.template)

    def chat(self, messages, images=None, stream: bool = False, max_new_tokens: int = 64, **kwargs):
        """The assistant's reply to a conversation [{"role", "content"}, ...] whose '<image>' placeholders take
        `images` in order (greedy unless sampling options are given; options as `decoders.generate.stream_tokens`);
        with stream=True an iterator of text pieces. The same contract as the multimodal model's `chat`."""
        from decoders.generate import stream_text

        inputs = self.processor()(messages, images)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("chat takes one conversation; use captions() or generate() for batches")
        h = self.embed(inputs["input_ids"].to(self.device), inputs["pixel_values"])
        kwargs.setdefault("eos_token_id", sorted(self._stop_ids()) or None)
        pieces = stream_text(self.language_model, self.tokenizer, inputs["input_ids"].to(self.device),
                             attention_mask=inputs["attention_mask"], inputs_embeds=h, max_new_tokens=max_new_tokens,
                             **kwargs)
        return stripped(pieces) if stream else "".join(pieces).strip()

    def _stop_ids(self) -> set[int]:
        """Ids that end a reply: the tokenizer's stop ids and its EOS."""
        return set(self.tokenizer.stop_ids) | ({self.tokenizer.eos_id} - {None})

    def transcribe(self, audio, **kwargs):
        """LLaVA reads images and text only: a clear error (the multimodal model or an ESPnet/Dolphin model hears)."""
        raise ValueError("this LLaVA model has no speech encoder, so it cannot transcribe; use the multimodal model "
                         "(mm.load()) or an ESPnet/Dolphin experiment")

    def caption(self, image, prompt: str | None = None, stream: bool = False, max_new_tokens: int = 64):
        """Caption of one image (PIL image or path) with the model's tokenizer and template, greedy; with stream=True
        an iterator of text pieces (the multimodal model's signature)."""
        if stream:
            return self.chat(user_prompt(DEFAULT_PROMPT if prompt is None else prompt), images=[image], stream=True,
                             max_new_tokens=max_new_tokens)
        return self.captions([image], prompt=prompt, max_new_tokens=max_new_tokens, progress=False)[0]

    def captions(self, images, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                 progress: bool | None = None) -> list[str]:
        """Greedy captions of images (PIL images or paths), `batch_size` at a time; a tqdm bar on stderr when
        `progress` (default: when there is more than one batch)."""
        images = check_batch(images, batch_size)
        processor = self.processor()
        tokenizer = processor.tokenizer
        stops = self._stop_ids()
        messages = user_prompt(DEFAULT_PROMPT if prompt is None else prompt)
        out = []
        show = len(images) > batch_size if progress is None else progress
        with tqdm(total=len(images), desc="captioning", unit="image", disable=not show, file=sys.stderr) as bar:
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                inputs = processor([messages] * len(batch), [[im] for im in batch])
                ids = self.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                    max_new_tokens=max_new_tokens, eos_token_id=sorted(stops) or None)
                for row in ids[:, inputs["input_ids"].shape[1]:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                    out.append(tokenizer.decode(row[:cut]).strip())
                bar.update(len(batch))
        return out

    # ----------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_state_dict(cls, cfg: LlavaConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                        device="cpu", source: str = "state dict") -> "LlavaForConditionalGeneration":
        """Build a model from one of our state dicts without a throwaway random initialisation."""
        return build_from_state_dict(lambda: cls(cfg), state_dict, source, dtype, device)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                        vision_tower: str | Path | None = None) -> "LlavaForConditionalGeneration":
        """Load a llava-hf, original LLaVA or our own directory (see the module docstring); attaches tokenizer and
        image processor when the directory has them. `vision_tower`: CLIP directory for original LLaVA checkpoints."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory")
        raw = read_json(path / "config.json")
        kind = raw.get("model_type")
        processor_dir = path
        mode = "crop"
        if kind == OUR_MODEL_TYPE:
            cfg = LlavaConfig.from_dict(raw)
            sd = read_hf_weights(path)
        elif kind == "llava":
            cfg = LlavaConfig.from_hf(raw)
            sd = convert_hf_llava_state_dict(read_hf_weights(path), cfg, source=str(path))
        elif kind == "llava_llama" or "mm_projector_type" in raw or "mm_hidden_size" in raw:
            weights = read_hf_weights(path)
            tower_sd, vision_cfg, tower_dir = original_vision_tower(path, raw, weights, vision_tower)
            cfg = LlavaConfig.from_original(raw, vision_cfg)
            sd = convert_original_llava_state_dict(weights, tower_sd, cfg, source=str(path))
            mode = "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"
            if not (path / "preprocessor_config.json").is_file() and tower_dir is not None:
                processor_dir = tower_dir
        else:
            raise CheckpointError(f"{path / 'config.json'}: model_type {kind!r} is not a LLaVA checkpoint "
                                  f"(expected 'llava', 'llava_llama' or {OUR_MODEL_TYPE!r})")
        model = cls.from_state_dict(cfg, sd, dtype, device, source=str(path))
        model.image_processor = _load_image_processor(processor_dir, cfg, mode)
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
        (path / "preprocessor_config.json").write_text(
            json.dumps({"image_processor_type": "mm.ImageProcessor", **self.image_processor.to_dict()}, indent=2))
        if self.tokenizer is not None:
            self.tokenizer.save(path)


def _load_image_processor(directory: Path, cfg: LlavaConfig, mode: str) -> ImageProcessor:
    """Ours or HF's preprocessor_config.json in directory; else CLIP preprocessing at the tower's image size."""
    f = directory / "preprocessor_config.json"
    if not f.is_file():
        return ImageProcessor(size=cfg.vision.image_size, crop_size=cfg.vision.image_size, mode=mode)
    d = read_json(f)
    try:
        if d.get("image_processor_type") == "mm.ImageProcessor":
            return ImageProcessor.from_dict({k: v for k, v in d.items() if k != "image_processor_type"})
        return ImageProcessor.from_hf_preprocessor_config(d, mode=mode)
    except ValueError as e:
        raise CheckpointError(f"{f}: {e}") from e
