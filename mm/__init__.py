"""mm: vision and speech encoders projected into one shared Llama decoder.

`mm.load(path)` opens any checkpoint directory the library understands and returns the matching model.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load"]

LLAVA_TYPES = {"llava", "llava_llama", "mm-llava"}


def load(path: str | Path | None = None, **kwargs):
    """Load a model directory: Hugging Face Llama or LLaVA, original LLaVA, Meta Llama, ESPnet/Dolphin ASR, or ours.

    Without a path, the shipped multimodal model (`mm train --recipe tiny`). Keyword arguments (dtype, device, ...) go to the loader.
    """
    import json

    from decoders.checkpoint import CheckpointError, read_json

    from . import assets

    path = Path(path) if path is not None else assets.default_multimodal_dir()
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        from decoders import LlamaForCausalLM

        return LlamaForCausalLM.from_meta(path, **kwargs)
    if not (path / "config.json").is_file():
        from .asr import ASRModel, is_espnet_dir

        if is_espnet_dir(path):
            return ASRModel.from_espnet_dir(path, **kwargs)
        raise CheckpointError(f"{path}: no config.json (nor an ESPnet config.yaml + *.pth, nor Meta params.json)")
    cfg = read_json(path / "config.json")
    kind = cfg.get("model_type")
    if kind in LLAVA_TYPES or "mm_projector_type" in cfg:
        from .llava import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    if kind == "llama":
        from decoders import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path, **kwargs)
    if kind == "mm-multimodal":
        from .multimodal import MultimodalModel

        return MultimodalModel.from_pretrained(path, **kwargs)
    if kind == "mm-asr":
        from .asr import ASRModel

        return ASRModel.from_pretrained(path, **kwargs)
    raise CheckpointError(f"{path / 'config.json'}: model_type {json.dumps(kind)} is not one mm can load")
