"""What a checkpoint path holds, and which loader opens it: the one table every entry point uses (`mm.load`,
`mm generate|caption|transcribe|chat|eval|quantize|rag|serve|agent`, the demos).

    format         told apart by                                          opened by
    meta-llama     params.json + consolidated.*.pth                       LlamaForCausalLM.from_meta
    espnet         config.yaml + *.pth (or meta.yaml), no config.json     ASRModel.from_espnet_dir
    llava          config.json model_type llava / llava_llama / mm-llava,  FusionModel.from_pretrained (image only)
                   or mm_projector_type (original LLaVA)
    llama          config.json model_type llama                           LlamaForCausalLM.from_pretrained
                   (+ quantization_config: AWQ GEMM, mm-int8, mm-w8a8:    decoders.awq_format.load_quantized
                   opened as llama-quantized)
    gguf           a *.gguf file (llama.cpp)                              decoders.gguf.load_gguf
    deepseek_v3    config.json model_type deepseek_v3 / deepseek_v2 /    DeepseekForCausalLM.from_pretrained
    deepseek_v2    mixtral (mixture-of-experts decoders)
    mixtral
    mm-multimodal  config.json model_type mm-multimodal                   FusionModel.from_pretrained (image + speech)
    mm-asr         config.json model_type mm-asr                          ASRModel.from_pretrained
"""
from __future__ import annotations

import json
from pathlib import Path

from decoders import DeepseekForCausalLM, LlamaForCausalLM
from decoders.awq_format import load_quantized
from decoders.checkpoint import CheckpointError, read_json
from decoders.gguf import load_gguf
from mm.assets import default_multimodal_dir
from mm.models.asr import ASRModel
from mm.models.espnet_files import is_espnet_dir
from mm.models.fusion import FusionModel

LLAVA_TYPES = {"llava", "llava_llama", "mm-llava"}
MOE_TYPES = ("deepseek_v3", "deepseek_v2", "mixtral")  # decoders.deepseek.DeepseekForCausalLM
TEXT_MODELS = ("llama", "meta-llama", "gguf") + MOE_TYPES  # formats whose models are plain decoders (`mm generate`)
CAPTIONERS = ("llava", "mm-multimodal")  # formats whose models describe images
TRANSCRIBERS = ("espnet", "mm-asr", "mm-multimodal")  # formats whose models transcribe speech
LOADERS = {  # format -> the function that opens it (the table above)
    "meta-llama": LlamaForCausalLM.from_meta,
    "llama": LlamaForCausalLM.from_pretrained,
    "llama-quantized": load_quantized,
    "gguf": load_gguf,
    **dict.fromkeys(MOE_TYPES, DeepseekForCausalLM.from_pretrained),
    **dict.fromkeys(("llava", "mm-multimodal"), FusionModel.from_pretrained),
    "mm-asr": ASRModel.from_pretrained,
    "espnet": ASRModel.from_espnet_dir,
}


def detect(path: str | Path) -> str:
    """The format name of a checkpoint path (see the table above); CheckpointError naming the path otherwise."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():  # an ESPnet config.yaml named directly
        return "espnet"
    if path.suffix == ".gguf" and path.is_file():
        return "gguf"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta-llama"
    if not (path / "config.json").is_file():
        if is_espnet_dir(path):
            return "espnet"
        raise CheckpointError(f"{path}: no config.json (nor an ESPnet config.yaml + *.pth, nor Meta params.json)")
    cfg = read_json(path / "config.json")
    kind = cfg.get("model_type")
    if kind in LLAVA_TYPES or "mm_projector_type" in cfg:
        return "llava"
    if kind in ("llama", "mm-multimodal", "mm-asr") or kind in MOE_TYPES:
        return kind
    raise CheckpointError(f"{path / 'config.json'}: model_type {json.dumps(kind)} is not one mm can load")


def load(path: str | Path | None = None, *, expect: tuple[str, ...] | None = None, **kwargs):
    """Open a checkpoint path with its format's loader (None: the shipped multimodal model).

    `expect`: the formats the caller can use (e.g. CAPTIONERS); another format is a CheckpointError saying what the
    path holds. Keyword arguments (dtype, device, and vision_tower for original LLaVA) go to the loader."""
    path = Path(path) if path is not None else default_multimodal_dir()
    kind = detect(path)
    if expect is not None and kind not in expect:
        raise CheckpointError(f"{path}: a {kind} checkpoint; this needs one of: {', '.join(expect)}")
    if kind != "llava":
        kwargs.pop("vision_tower", None)
    if kind == "llama" and "quantization_config" in read_json(path / "config.json"):  # mm quantize, or AutoAWQ
        kind = "llama-quantized"
    return LOADERS[kind](path, **kwargs)
