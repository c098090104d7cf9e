"""LLaVA (Liu et al. 2023, arXiv 2304.08485 / 2310.03744): the image-only configuration of the one fusion model,
`mm.models.fusion.FusionModel` (ViT + projector + decoder). `LlavaForConditionalGeneration.from_pretrained(dir)`
reads llava-hf (both key layouts), original LLaVA (`vision_tower=DIR` names its CLIP tower) and our `mm-llava`
directories (see `mm.models.fusion_config.read_checkpoint` and `mm.models.convert_llava`)."""
from mm.models.fusion import DEFAULT_PROMPT, FusionModel as LlavaForConditionalGeneration, Projector, stripped
from mm.models.fusion_config import FusionConfig as LlavaConfig, text_config

__all__ = ["DEFAULT_PROMPT", "LlavaConfig", "LlavaForConditionalGeneration", "Projector", "stripped", "text_config"]
