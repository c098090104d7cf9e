"""The model that sees, hears and answers: the image + speech configuration of `mm.models.fusion.FusionModel`
(ViT + projector, E-Branchformer + CTC head + speech adapter, one Llama decoder), `model_type: mm-multimodal`.

`MultimodalModel` is that class with our training recipe's call: `model(input_ids, pixel_values, speech,
speech_lengths, attention_mask, labels, ctc_targets, ...)` returns a `MultimodalOutput` (logits and losses), where
`FusionModel.forward` returns the logits alone.
"""
from mm.models.fusion import CAPTION_PROMPT, FusionModel, FusionOutput as MultimodalOutput
from mm.models.fusion_config import MultimodalConfig
from mm.models.fusion_speech import DECODE_CTC_WEIGHT, TRANSCRIBE_PROMPT, check_decode

__all__ = ["CAPTION_PROMPT", "DECODE_CTC_WEIGHT", "TRANSCRIBE_PROMPT", "MultimodalConfig", "MultimodalModel",
           "MultimodalOutput", "check_decode"]


class MultimodalModel(FusionModel):
    """FusionModel (image + speech by default) whose forward is `FusionModel.outputs`: logits and losses."""

    config_class = MultimodalConfig
    forward = FusionModel.outputs
