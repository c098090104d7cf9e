"""LLaVA checkpoints -> our LlavaForConditionalGeneration's keys: llava-hf (both key layouts) and original LLaVA
(haotian-liu) with its CLIP tower; the Llama and CLIP parts go through their own converters."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from decoders.checkpoint import CheckpointError, read_hf_weights, read_json
from decoders.convert_hf import convert_hf_state_dict
from encoders.vit import ViTConfig, convert_hf_clip_vision_state_dict

if TYPE_CHECKING:
    from mm.models.llava import LlavaConfig

# transformers' LlavaConfig fills a missing vision_config with LLaVA-1.5's CLIP ViT-L/14-336.
LLAVA_VISION_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 336,
                         "num_hidden_layers": 24, "num_attention_heads": 16}


def _split(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Pop the tensors under any of prefixes, with the prefix removed."""
    out = {}
    for k in [k for k in sd if k.startswith(prefixes)]:
        prefix = next(p for p in prefixes if k.startswith(p))
        out[k[len(prefix):]] = sd.pop(k)
    return out


def _ours(vision: dict, projector: dict, language: dict) -> dict[str, torch.Tensor]:
    """Join converted parts under this module's names."""
    out = {f"vision_tower.{k}": v for k, v in vision.items()}
    out.update({f"projector.{k}": v for k, v in projector.items()})
    out.update({f"language_model.{k}": v for k, v in language.items()})
    return out


def convert_hf_llava_state_dict(sd: dict[str, torch.Tensor], cfg: LlavaConfig,
                                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """llava-hf keys (older `language_model.model.*` or newer `model.language_model.*` layout) -> ours."""
    sd = dict(sd)
    language = {"model." + k: v for k, v in _split(sd, ("model.language_model.", "language_model.model.")).items()}
    for head in ("lm_head.weight", "language_model.lm_head.weight"):
        if head in sd:
            language["lm_head.weight"] = sd.pop(head)
    vision = _split(sd, ("model.vision_tower.", "vision_tower."))
    projector = _split(sd, ("model.multi_modal_projector.", "multi_modal_projector."))
    if sd:
        raise CheckpointError(f"{source}: unexpected keys outside the language model, vision tower and projector: "
                              + ", ".join(sorted(sd)))
    if not vision:
        raise CheckpointError(f"{source}: no vision tower keys (vision_tower.* or model.vision_tower.*)")
    return _ours(convert_hf_clip_vision_state_dict(vision), projector,
                 convert_hf_state_dict(language, cfg.text, source=source))


# The towers original LLaVA checkpoints name, for checkpoints that hold the tower weights but no tower config.
KNOWN_CLIP_TOWERS = {
    "openai/clip-vit-large-patch14-336": LLAVA_VISION_DEFAULTS,
    "openai/clip-vit-large-patch14": dict(LLAVA_VISION_DEFAULTS, image_size=224),
}


def original_vision_tower(path: Path, raw: dict, weights: dict, vision_tower) -> tuple[dict, ViTConfig, Path | None]:
    """The CLIP tower of an original LLaVA checkpoint: (HF CLIP state dict, its config, its directory if any).

    Tower weights inside the checkpoint (a tuned tower) win over the tower directory's; the config comes from the
    directory (`vision_tower` or a local `mm_vision_tower`), else from the known OpenAI tower names."""
    inside = _split(weights, ("model.vision_tower.vision_tower.", "model.vision_tower."))
    name = vision_tower or raw.get("mm_vision_tower")
    candidates = [Path(name), path / name] if name else []
    tower_dir = next((c for c in candidates if (c / "config.json").is_file()), None)
    if tower_dir is not None:
        cfg = ViTConfig.from_hf_clip_vision(read_json(tower_dir / "config.json"))
        return inside or read_hf_weights(tower_dir), cfg, tower_dir
    if inside and name in KNOWN_CLIP_TOWERS:
        return inside, ViTConfig.from_hf_clip_vision(KNOWN_CLIP_TOWERS[name]), None
    raise CheckpointError(
        f"{path}: this original LLaVA checkpoint does not hold its vision tower, and mm_vision_tower={name!r} is not "
        f"a local CLIP directory. Pass vision_tower=DIR (an HF CLIPVisionModel or CLIPModel directory)")


def convert_original_llava_state_dict(sd: dict[str, torch.Tensor], tower_sd: dict[str, torch.Tensor],
                                      cfg: LlavaConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Original LLaVA keys (`model.*` Llama, `model.mm_projector.{0,2}` or `model.mm_projector`) + HF CLIP tower -> ours."""
    sd = dict(sd)
    mm = _split(sd, ("model.mm_projector.",))
    names = {"0": "linear_1", "2": "linear_2"} if cfg.projector_type == "mlp2x_gelu" else {}
    projector = {}
    for k, v in mm.items():
        idx, _, param = k.rpartition(".")
        if cfg.projector_type == "linear" and not idx:
            projector[f"linear_1.{param}"] = v
        elif idx in names:
            projector[f"{names[idx]}.{param}"] = v
        else:
            raise CheckpointError(f"{source}: projector key model.mm_projector.{k} does not fit {cfg.projector_type!r}")
    return _ours(convert_hf_clip_vision_state_dict(tower_sd), projector, convert_hf_state_dict(sd, cfg.text, source=source))
