"""The config of `mm.models.fusion.FusionModel`: a decoder (Llama, or DeepSeek/Mixtral) and its modalities.

    image   vision (ViTConfig) + projector + image_token_index       (LLaVA, Liu et al. 2023)
    speech  speech (SpeechEncoderConfig) + adapter + audio_token_id    (E-Branchformer + CTC + k-fold stacking MLP)

Each modality is present when its encoder config is (vision / speech not None). Our config.json is written as
`model_type: mm-llava` for image-only models (LLaVA's keys) and `mm-multimodal` when there is speech (LLaVA's
keys + speech_config, adapter, audio_token_id, ctc_weight, system, max_audio_seconds); llava-hf and original LLaVA
config.json read as image-only configs (`from_hf`, `from_original`).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch.nn.functional as F

from decoders.checkpoint import CheckpointError, check_config_keys, read_hf_weights, read_json
from decoders.deepseek import MODEL_TYPES as MOE_TYPES, DeepseekConfig
from decoders.llama import LlamaConfig
from encoders.image import ImageProcessor
from encoders.speech_encoder import SpeechEncoderConfig
from encoders.vit import ViTConfig, quick_gelu
from mm.models.convert_llava import (LLAVA_VISION_DEFAULTS, convert_hf_llava_state_dict, convert_original_llava_state_dict,
                                     original_vision_tower)
from mm.models.speech_adapter import SpeechAdapterConfig, fit_adapter

LLAVA_TYPE, MULTIMODAL_TYPE = "mm-llava", "mm-multimodal"  # our config.json without / with speech
SPEECH_KEYS = ("adapter", "audio_token_id", "ctc_weight", "max_audio_seconds")  # written only with speech
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
PROJECTOR_ACTS = {
    "gelu": F.gelu,  # exact erf GELU, transformers' ACT2FN["gelu"]
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}


# text_config keys read by the decoders' `from_hf` or written by their `to_hf` beside their fields
TEXT_HF_KEYS = frozenset("model_type architectures hidden_act attention_bias mlp_bias rope_parameters rope_scaling "
                         "num_local_experts sliding_window moe_layer_freq".split())
# keys transformers writes into config.json that change nothing at inference (its Llama ignores them too): bookkeeping,
# training-only settings, and the generation/task defaults that 4.x wrote into every nested config
HF_INERT_KEYS = frozenset("""_name_or_path _commit_hash _attn_implementation_autoset auto_map dtype torch_dtype
    transformers_version attention_dropout initializer_range pretraining_tp use_cache add_cross_attention bad_words_ids
    begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty
    do_sample early_stopping encoder_no_repeat_ngram_size exponential_decay_length_penalty finetuning_task
    forced_bos_token_id forced_eos_token_id id2label is_decoder is_encoder_decoder label2id length_penalty max_length
    min_length no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores prefix problem_type pruned_heads remove_invalid_values repetition_penalty
    return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss
    tie_encoder_decoder tokenizer_class top_k top_p torchscript typical_p use_bfloat16""".split())
TEXT_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def text_config(d: dict) -> LlamaConfig | DeepseekConfig:
    """The decoder's config from a `text_config` dict: DeepSeek-V2/V3 or Mixtral by its model_type, else Llama."""
    return DeepseekConfig.from_hf(d) if d.get("model_type") in MOE_TYPES else LlamaConfig.from_hf(d)


def unknown_text_keys(d: dict) -> list[str]:
    """The keys of a `text_config` dict that its decoder does not take and transformers does not write (a typo, or a
    setting of another architecture)."""
    decoder = DeepseekConfig if d.get("model_type") in MOE_TYPES else LlamaConfig
    return sorted(set(d) - {f.name for f in fields(decoder)} - TEXT_HF_KEYS - HF_INERT_KEYS)


@dataclass
class FusionConfig:
    """A decoder and its modalities (see the module docstring); image-only by default (LLaVA-1.5's shapes).

    vision_feature_layer: ViT hidden state(s) to take (HF indexing, 0 = embeddings, -2 = before the last block);
        a list concatenates the layers on the channel dim.
    vision_feature_select_strategy: "default" drops the CLS token, "full" keeps it.
    vision_feature_norm: pass the selected features through the ViT's final LayerNorm first (SigLIP/PaliGemma
        style; keeps a tower trained from scratch at unit scale). LLaVA's CLIP towers: False.
    image_token_index / audio_token_id: the ids marking one image / speech feature in input_ids (they may lie just
        beyond the text vocabulary).
    template: the conversation template of `mm.models.conversation`; system: its system text (None: its own).
    ctc_weight: weight of the speech encoder's CTC loss in training. max_audio_seconds: longest audio accepted.
    """

    text: LlamaConfig | DeepseekConfig = field(default_factory=LlamaConfig)
    vision: ViTConfig | None = field(default_factory=lambda: ViTConfig.from_hf_clip_vision(LLAVA_VISION_DEFAULTS))
    image_token_index: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    vision_feature_norm: bool = False
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    template: str = "llava_v1"
    speech: SpeechEncoderConfig | None = None
    adapter: SpeechAdapterConfig | None = None
    audio_token_id: int = 32001
    ctc_weight: float = 0.3
    system: str | None = None
    max_audio_seconds: float = 30.0

    def __post_init__(self):
        name = type(self).__name__
        if isinstance(self.text, dict):
            self.text = text_config(self.text)
        if isinstance(self.vision, dict):
            self.vision = ViTConfig.from_dict(self.vision)
        if isinstance(self.speech, dict):
            self.speech = SpeechEncoderConfig.from_dict(self.speech)
        if self.vision is None and self.speech is None:
            raise ValueError(f"{name}: no modality (vision and speech are both None); a text model is a decoder alone")
        if self.vision is not None:
            self._check_image(name)
        if self.speech is not None:
            if isinstance(self.adapter, dict):
                check_config_keys(SpeechAdapterConfig, self.adapter)
                self.adapter = SpeechAdapterConfig(**self.adapter)
            try:
                self.adapter = fit_adapter(self.adapter, self.speech.encoder.output_size, self.text.hidden_size)
            except ValueError as e:
                raise ValueError(f"{name}: speech {e}") from None
            if self.vision is not None and self.audio_token_id == self.image_token_index:
                raise ValueError(f"{name}: audio_token_id and image_token_index are both {self.audio_token_id}")

    def _check_image(self, name: str) -> None:
        if isinstance(self.vision_feature_layer, (list, tuple)):
            self.vision_feature_layer = [int(i) for i in self.vision_feature_layer]
            if not self.vision_feature_layer:
                raise ValueError(f"{name}: vision_feature_layer is an empty list")
        n = self.vision.depth + 1
        for i in self.feature_layers:
            if not -n <= i < n:
                raise ValueError(f"{name}: vision_feature_layer {i} is out of range for a ViT of "
                                 f"{self.vision.depth} blocks (valid {-n}..{n - 1})")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"{name}: vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"{name}: projector type {self.projector_type!r} is not supported {PROJECTOR_TYPES}")
        if self.projector_hidden_act not in PROJECTOR_ACTS:
            raise ValueError(f"{name}: projector_hidden_act {self.projector_hidden_act!r} is not supported "
                             f"{sorted(PROJECTOR_ACTS)}")
        if self.image_token_index < 0:
            raise ValueError(f"{name}: image_token_index must be >= 0, got {self.image_token_index}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present: "image", "speech" or both."""
        return ("image",) * (self.vision is not None) + ("speech",) * (self.speech is not None)

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
        if self.vision is None:
            raise ValueError("this model has no vision tower: it takes no images")
        h, w = (image_size, image_size) if isinstance(image_size, int) else (image_size or (self.vision.image_size,) * 2)
        p = self.vision.patch_size
        full = self.vision_feature_select_strategy == "full" and self.vision.class_token
        return (h // p) * (w // p) + int(full)

    def to_dict(self) -> dict:
        """Our config.json: mm-llava without speech, mm-multimodal with it."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("text", "vision", "speech")}
        vision = None if self.vision is None else self.vision.to_dict()
        if self.speech is None:
            for k in SPEECH_KEYS + (("system",) if self.system is None else ()):
                del d[k]
            return {"model_type": LLAVA_TYPE, **d, "text_config": self.text.to_hf(), "vision_config": vision}
        d["adapter"] = asdict(self.adapter)
        return {"model_type": MULTIMODAL_TYPE, **d, "text_config": self.text.to_hf(), "vision_config": vision,
                "speech_config": self.speech.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        """Inverse of `to_dict`; unknown keys (speech keys in an mm-llava config among them) are an error."""
        d = dict(d)
        kind = d.pop("model_type", None)
        if kind not in (LLAVA_TYPE, MULTIMODAL_TYPE):
            raise ValueError(f"config is not model_type {LLAVA_TYPE!r} or {MULTIMODAL_TYPE!r}")
        text, vision = d.pop("text_config", None), d.pop("vision_config", None)
        speech = d.pop("speech_config", None) if kind == MULTIMODAL_TYPE else None
        check_config_keys(cls, d)
        if not isinstance(text, dict):
            raise ValueError(f"text_config must be a JSON object, got {json.dumps(text)}")
        if unknown := unknown_text_keys(text):  # our own files hold no others
            raise ValueError(f"text_config: unknown keys {unknown}")
        if missing := [k for k in TEXT_SIZE_KEYS if k not in text]:  # ours always hold them: no 7B defaults here
            raise ValueError(f"text_config lacks {missing}")
        speech_keys = sorted(set(d) & {*SPEECH_KEYS, "speech"}) if kind == LLAVA_TYPE else []
        if speech_keys:
            raise ValueError(f"{cls.__name__}: an {LLAVA_TYPE} config (no speech) with speech keys {speech_keys}")
        return cls(text=text_config(text), vision=None if vision is None else ViTConfig.from_dict(vision),
                   speech=None if speech is None else SpeechEncoderConfig.from_dict(speech), **d)

    @classmethod
    def from_hf(cls, d: dict) -> "FusionConfig":
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
            speech=None,
        )

    @classmethod
    def from_original(cls, d: dict, vision: ViTConfig) -> "FusionConfig":
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
            speech=None,
        )


@dataclass
class MultimodalConfig(FusionConfig):
    """FusionConfig with speech by default (image + speech, our recipe's model)."""

    speech: SpeechEncoderConfig | None = field(default_factory=SpeechEncoderConfig)


def read_checkpoint(path: Path, vision_tower: str | Path | None = None):
    """(config, state dict with our names, image processor or None) of a llava-hf, original LLaVA or our directory
    (see `mm.models.fusion`); `vision_tower`: CLIP directory for original LLaVA checkpoints."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    raw = read_json(path / "config.json")
    kind, processor_dir, mode = raw.get("model_type"), path, "crop"
    if kind in (LLAVA_TYPE, MULTIMODAL_TYPE):
        try:
            cfg = FusionConfig.from_dict(raw)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
        sd = read_hf_weights(path)
    elif kind == "llava":
        cfg = FusionConfig.from_hf(raw)
        if ignored := unknown_text_keys(raw.get("text_config") or {}):  # transformers' Llama ignores them too
            warnings.warn(f"{path / 'config.json'}: text_config keys {ignored} are not Llama settings; ignored")
        sd = convert_hf_llava_state_dict(read_hf_weights(path), cfg, source=str(path))
    elif kind == "llava_llama" or "mm_projector_type" in raw or "mm_hidden_size" in raw:
        weights = read_hf_weights(path)
        tower_sd, vision_cfg, tower_dir = original_vision_tower(path, raw, weights, vision_tower)
        cfg = FusionConfig.from_original(raw, vision_cfg)
        sd = convert_original_llava_state_dict(weights, tower_sd, cfg, source=str(path))
        mode = "pad" if raw.get("image_aspect_ratio") == "pad" else "crop"
        if not (path / "preprocessor_config.json").is_file() and tower_dir is not None:
            processor_dir = tower_dir
    else:
        raise CheckpointError(f"{path / 'config.json'}: model_type {kind!r} is not a LLaVA checkpoint nor ours "
                              f"(expected 'llava', 'llava_llama', {LLAVA_TYPE!r} or {MULTIMODAL_TYPE!r})")
    return cfg, sd, None if cfg.vision is None else _load_image_processor(processor_dir, cfg, mode)


def _load_image_processor(directory: Path, cfg: FusionConfig, mode: str) -> ImageProcessor:
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
